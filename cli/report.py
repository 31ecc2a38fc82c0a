"""`wasi-compress report REPORT.json...`: one report.html (plots embedded) from saved analyze, convert
and finetune JSON documents, e.g. the outputs of a whole pipeline. Thin over report_html.write_report."""

from __future__ import annotations

from pathlib import Path

import click

from wasi_compress import gates
from wasi_compress.errors import UserError
from wasi_compress.reports import ANALYZE_SCHEMA, CONVERT_SCHEMA, FINETUNE_SCHEMA

_ARGUMENT_OF = {ANALYZE_SCHEMA: "analyze", CONVERT_SCHEMA: "convert", FINETUNE_SCHEMA: "finetune"}


@click.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and its PNGs.")
def command(reports: tuple[Path, ...], directory: Path) -> None:
    """Render analyze, convert and finetune JSON reports (at most one of each) into one HTML report."""
    from wasi_compress.report_html import write_report

    documents: dict[str, dict] = {}
    for path in reports:
        doc = gates.load_report(path)
        kind = _ARGUMENT_OF.get(doc["schema"])
        if kind is None:
            raise UserError(f"{path}: a {doc['schema']} document has no plots; give analyze, convert or finetune reports")
        if kind in documents:
            raise UserError(f"{path}: a second {kind} report; give at most one of each kind")
        documents[kind] = doc
    click.echo(f"wrote {write_report(directory, **documents)}")
