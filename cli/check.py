"""`wasi-compress check`: gate a report (or a model) in CI. Exit 0 when every gate passes, 1 when any
fails, 2 on bad usage or input. The gates themselves are defined in wasi_compress.gates; this module
parses options, finds the configuration and renders the result as a table, JUnit XML, Markdown and JSON."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from wasi_compress import gates
from wasi_compress.errors import UserError
from wasi_compress.fileio import write_json, write_text_atomic
from wasi_compress.units import format_bytes


def _format_count(value: float) -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def format_value(value: float, unit: str) -> str:
    """A figure as people read it: bytes in KB/MB/GB, counts with K/M/G, accuracy in percent."""
    if unit == "bytes":
        return format_bytes(value)
    if unit == "count":
        return _format_count(value)
    if unit == "fraction":
        return f"{value * 100:.2f}%"
    return f"{value:.3g}"


def _limit_text(gate: gates.GateResult) -> str:
    return f"{'<=' if gate.direction == 'max' else '>='} {format_value(gate.limit, gate.unit)}"


def _baseline_text(gate: gates.GateResult) -> str:
    return "" if gate.baseline is None else format_value(gate.baseline, gate.unit)


def _failure_message(gate: gates.GateResult) -> str:
    message = f"{gate.figure} is {format_value(gate.actual, gate.unit)} ({gate.key}); the gate requires {_limit_text(gate)}"
    return message + (f" (baseline {_baseline_text(gate)})" if gate.baseline is not None else "")


def render_table(result: gates.CheckResult) -> Table:
    """The terminal table; narrow enough for an 80-column CI log (the report keys are in the other outputs)."""
    with_baseline = any(g.baseline is not None for g in result.gates)
    table = Table(title=f"{result.target} ({result.schema})", title_justify="left")
    table.add_column("gate")
    table.add_column("actual", justify="right")
    table.add_column("limit", justify="right")
    if with_baseline:
        table.add_column("baseline", justify="right")
    table.add_column("status")
    for gate in result.gates:
        status = "[green]pass[/green]" if gate.passed else "[bold red]FAIL[/bold red]"
        row = [gate.name, format_value(gate.actual, gate.unit), _limit_text(gate)]
        table.add_row(*row, *([_baseline_text(gate)] if with_baseline else []), status)
    return table


def render_junit(result: gates.CheckResult) -> str:
    """JUnit XML with one testcase per gate, so CI systems list each gate as a test."""
    failures = sum(not g.passed for g in result.gates)
    counts = {"tests": str(len(result.gates)), "failures": str(failures), "errors": "0", "skipped": "0", "time": "0"}
    suites = ET.Element("testsuites", {"name": "wasi-compress check", **counts})
    suite = ET.SubElement(suites, "testsuite", {"name": f"wasi-compress check {result.target}", **counts})
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", {"name": "schema", "value": result.schema})
    if result.baseline is not None:
        ET.SubElement(properties, "property", {"name": "baseline", "value": result.baseline})
    for gate in result.gates:
        case = ET.SubElement(suite, "testcase", {"classname": "wasi-compress.check", "name": gate.name, "time": "0"})
        if not gate.passed:
            failure = ET.SubElement(case, "failure", {"message": _failure_message(gate), "type": "GateFailed"})
            failure.text = _failure_message(gate)
    if result.notes:
        ET.SubElement(suite, "system-out").text = "\n".join(result.notes)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(result: gates.CheckResult) -> str:
    """A Markdown table for a CI job summary (e.g. appended to $GITHUB_STEP_SUMMARY)."""
    passed = sum(g.passed for g in result.gates)
    with_baseline = any(g.baseline is not None for g in result.gates)
    source = f"Report: `{_md(result.target)}` ({result.schema})"
    if result.baseline is not None:
        source += f", baseline: `{_md(result.baseline)}`"
    header = ["Gate", "Report key", "Actual", "Limit", *(["Baseline"] if with_baseline else []), "Status"]
    align = ["---", "---", "---:", "---:", *(["---:"] if with_baseline else []), "---"]
    lines = [
        f"### wasi-compress check {'passed' if result.passed else 'failed'}: {passed} of {len(result.gates)} gates pass",
        "", source, "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for gate in result.gates:
        cells = [gate.name, f"`{gate.key}`", format_value(gate.actual, gate.unit), _md(_limit_text(gate)),
                 *([_baseline_text(gate)] if with_baseline else []), "pass" if gate.passed else "**FAIL**"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {note}" for note in result.notes)] if result.notes else []
    return "\n".join(lines) + "\n"


def _load_target(target: str, batch_size: int) -> dict:
    path = Path(target)
    if path.suffix.lower() == ".json":
        return gates.load_report(path)  # a report that does not exist is a typo, not a model to analyze
    from wasi_compress.analysis import analyze_model  # imports torch: only when a model is given

    report = analyze_model(target, batch_size=batch_size)
    gates.validate_report(report, target)
    return report


@click.command("check")
@click.argument("target")
@click.option("--max-size", metavar="SIZE", help="Model size limit, e.g. 50MB or 12MiB (KB, MB, GB: powers of 1000; KiB, MiB, GiB: powers of 1024).")
@click.option("--max-params", metavar="N", help="Parameter count limit, e.g. 5e6 or 5M (K, M, G, T: powers of 1000).")
@click.option("--max-flops", metavar="N", help="FLOPs limit for one forward pass, e.g. 1.2G.")
@click.option("--max-train-memory", metavar="SIZE", help="Training-memory limit (analyze total, finetune peak), in the units of --max-size.")
@click.option("--min-accuracy", metavar="FRACTION", help="Lowest accuracy, a fraction in [0, 1] (0.9) or a percentage (90%).")
@click.option("--max-onnx-diff", metavar="X", help="Largest max-abs difference between the ONNX export and PyTorch.")
@click.option("--baseline", metavar="REPORT.json", help="A report to compare size, train memory and accuracy with.")
@click.option("--max-regression", metavar="PCT",
              help="Allowed regression against --baseline, in percent of the baseline: size and train memory fail "
                   "above baseline x (1 + PCT/100); accuracy fails below baseline x (1 - PCT/100), a relative drop.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Gate configuration: a wasi-compress.toml ([gates]) or pyproject.toml "
                   "([tool.wasi-compress.gates]). Default: the nearest one in this folder or its parents up to the "
                   "git root. Options given on the command line override the file.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch size when TARGET is a model analyzed on the fly.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML, one testcase per gate.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown summary table.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the wasi-compress/check/1 document ('-' for stdout; the table then goes to stderr).")
@click.pass_context
def command(ctx: click.Context, target: str, config_path: Path | None, batch_size: int, junit: Path | None,
            markdown: Path | None, json_path: str | None, **options: str | None) -> None:
    """Gate TARGET against size, parameter, FLOP, memory, accuracy and ONNX limits.

    TARGET is a JSON report of analyze, convert or finetune (any path ending in .json), or a MODEL, which
    is then analyzed. Gates come from the options and from the gates table of a configuration file; the
    options win. Exit status: 0 when every gate passes, 1 when any fails, 2 on bad usage or input,
    including a gate whose figure the report does not record."""
    try:
        passed = _check(target, config_path, batch_size, junit, markdown, json_path, options)
    except (UserError, click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
        raise
    except Exception as exc:  # a crash must never read as a verdict: exit 1 means "a gate failed"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"check stopped on an unexpected error, not a gate verdict: {type(exc).__name__}"
                        + (f": {first}" if first else "")) from exc
    ctx.exit(0 if passed else 1)


def _check(target: str, config_path: Path | None, batch_size: int, junit: Path | None, markdown: Path | None,
           json_path: str | None, options: dict) -> bool:
    """The check itself; True when every gate passes."""
    config_path = config_path or gates.find_config(Path.cwd())
    settings = gates.load_config(config_path) if config_path else {}
    command_line = {key.replace("_", "-"): value for key, value in options.items()}
    settings.update(gates.parse_settings(command_line))
    limits = gates.Limits.from_settings(settings)
    from wasi_compress.outputs import check_paths, lock_outputs

    outputs = {"--junit": junit, "--markdown": markdown, "--json": json_path}
    check_paths({"TARGET": target, "--config": config_path, "--baseline": limits.baseline}, outputs)  # before any work
    with lock_outputs(outputs.values()):  # two runs cannot write the same output
        return _gate(target, batch_size, limits, config_path, junit, markdown, json_path)


def _gate(target: str, batch_size: int, limits: gates.Limits, config_path: Path | None, junit: Path | None,
          markdown: Path | None, json_path: str | None) -> bool:
    """Evaluate the gates, show them, write the machine outputs; True when every gate passes."""
    report = _load_target(target, batch_size)
    baseline = gates.load_report(limits.baseline) if limits.baseline is not None else None
    result = gates.evaluate(report, limits, target=target, baseline=baseline,
                            baseline_name=str(limits.baseline) if limits.baseline is not None else None)

    console = Console(stderr=json_path == "-")
    if config_path:
        console.print(f"gates from {config_path}", highlight=False)
    console.print(render_table(result))
    for note in result.notes:
        console.print(note, highlight=False)
    console.print(f"{sum(g.passed for g in result.gates)} of {len(result.gates)} gates pass",
                  style="green" if result.passed else "bold red", highlight=False)
    from wasi_compress.outputs import Outputs

    with Outputs() as outputs:  # all or none
        if junit:
            outputs.then(lambda: (write_text_atomic(junit, render_junit(result)), junit)[1])
        if markdown:
            outputs.then(lambda: (write_text_atomic(markdown, render_markdown(result)), markdown)[1])
        if json_path:
            outputs.then(lambda: (write_json(json_path, result.to_json()), None if json_path == "-" else json_path)[1])
        outputs.commit()
    return result.passed
