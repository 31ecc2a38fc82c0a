"""`wasi-compress report REPORT.json...`: one report.html (plots embedded) from saved analyze, convert
and finetune JSON documents, e.g. the outputs of a whole pipeline. Thin over report_html.write_report."""

from __future__ import annotations

from pathlib import Path

import click

from wasi_compress import gates
from wasi_compress.errors import UserError
from wasi_compress.reports import ANALYZE_SCHEMA, CONVERT_SCHEMA, FINETUNE_SCHEMA

_ARGUMENT_OF = {ANALYZE_SCHEMA: "analyze", CONVERT_SCHEMA: "convert", FINETUNE_SCHEMA: "finetune"}
# the keys each section's plots and tables read: a document without one was not written by this tool
_REQUIRED = {"analyze": ("layers", "totals"), "convert": ("layers", "original_bytes", "total_bytes", "pareto"),
             "finetune": ("epochs", "final", "memory")}


@click.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html and its PNGs.")
def command(reports: tuple[Path, ...], directory: Path) -> None:
    """Render analyze, convert and finetune JSON reports (at most one of each) into one HTML report."""
    from wasi_compress.outputs import check_paths, lock_outputs, report_html

    check_paths({f"REPORT {path}": path for path in reports}, {"-o": report_html(directory)})  # before any work
    with lock_outputs([report_html(directory)]):  # two runs cannot write the same folder
        click.echo(f"wrote {_render(reports, directory)}")


def _render(reports: tuple[Path, ...], directory: Path) -> Path:
    """Read and check every report, then write the folder; the path of report.html."""
    from wasi_compress.report_html import write_report

    documents: dict[str, dict] = {}
    for path in reports:
        doc = gates.load_report(path)
        kind = _ARGUMENT_OF.get(doc["schema"])
        if kind is None:
            raise UserError(f"{path}: a {doc['schema']} document has no plots; give analyze, convert or finetune reports")
        if kind in documents:
            raise UserError(f"{path}: a second {kind} report; give at most one of each kind")
        _check_readable(doc, kind, path)
        documents[kind] = doc
    try:
        return write_report(directory, **documents)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(f"the reports hold a figure this version cannot draw ({type(exc).__name__}: {exc}); "
                        "regenerate them with this version") from None


def _check_readable(doc: dict, kind: str, path: Path) -> None:
    """One line, before anything is drawn, for a document missing what its section reads or holding a
    number that is not finite (NaN is not a figure)."""
    missing = [key for key in _REQUIRED[kind] if key not in doc]
    if missing:
        raise UserError(f"{path}: this {kind} report has no {', '.join(missing)}; give a report written by "
                        f"`wasi-compress {kind} --json`")
    bad = _non_finite(doc)
    if bad:
        raise UserError(f"{path}: {bad} is not a finite number; the report is damaged")


def _non_finite(value, where: str = "") -> str | None:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return where or "a value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None
