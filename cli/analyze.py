"""`wasi-compress analyze MODEL`: per linear layer, how compressible the model is and where its training
memory goes. Thin: options -> wasi_compress.analysis.analyze -> table / JSON / report."""

from __future__ import annotations

import click
from rich.table import Table

from wasi_compress.cli._common import (
    format_count as _count,
    check_device, console_for, device_option, load_from_options, model_options, parse_float_list, plain, progress_bar,
    wraps_user_errors,
)
from wasi_compress.errors import UserError
from wasi_compress.units import format_bytes


def render(doc: dict, console) -> None:
    thresholds = [k for k in doc["layers"][0]["ranks"]] if doc["layers"] else []
    table = Table(title=f"{doc['model']}: {len(doc['layers'])} linear layers (capture: {doc['capture']})", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("role")
    table.add_column("out x in", justify="right")
    table.add_column("act. bytes", justify="right")
    table.add_column(f"rank at {'/'.join(thresholds)}", justify="right")
    table.add_column("break-even", justify="right")
    for layer in doc["layers"]:
        act = format_bytes(layer["activation_bytes"]) if layer["activation_bytes"] else "n/a"
        ranks = "/".join(str(layer["ranks"][t]) for t in thresholds)
        table.add_row(layer["name"], layer["role"], f"{layer['out_features']}x{layer['in_features']}", act, ranks,
                      str(layer["break_even_rank"]))
    console.print(table)

    tot, lin = doc["totals"], doc["totals"]["linear"]
    summary = Table(title=f"training memory of one step at batch {doc['batch_size']} ({doc['dtype']})", title_justify="left")
    summary.add_column("")
    summary.add_column("whole model", justify="right")
    summary.add_column("linear layers", justify="right")
    summary.add_column("source")
    rows = [
        ("params", _count(tot["params"]), _count(lin["params"]), "counted"),
        ("weights", format_bytes(tot["weight_bytes"]), format_bytes(lin["weight_bytes"]), "derived"),
        ("FLOPs (fvcore, 1 MAC = 1)", _count(tot["flops"]), _count(lin["flops"]), "measured / derived"),
    ]
    tm, lm = tot["train_memory"], lin["train_memory"]
    rows += [
        ("gradients", format_bytes(tm["grads_bytes"]), format_bytes(lm["grads_bytes"]), "derived"),
        ("SGD momentum state", format_bytes(tm["optimizer_bytes"]["sgd_momentum"]), format_bytes(lm["optimizer_bytes"]["sgd_momentum"]), "derived"),
        ("AdamW state", format_bytes(tm["optimizer_bytes"]["adamw"]), format_bytes(lm["optimizer_bytes"]["adamw"]), "derived"),
        ("saved activations", format_bytes(tm["saved_activation_bytes"]), format_bytes(lm["saved_activation_bytes"]), "measured"),
        ("total (AdamW)", format_bytes(tm["total_bytes"]), format_bytes(lm["total_bytes"]), "derived"),
    ]
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    if "saved_by_family" in tot:
        console.print(_family_table(tot["saved_by_family"], tm["saved_activation_bytes"]))
    if doc.get("memory_levers"):
        floors = Table(title=f"smallest training-step peak per memory lever, batch {doc['batch_size']} "
                             "(derived from measured steps)", title_justify="left")
        floors.add_column("lever")
        floors.add_column("smallest peak", justify="right")
        for name, value in doc["memory_levers"]["smallest_peak_bytes"].items():
            floors.add_row(name, format_bytes(value))
        console.print(floors)
    if doc.get("capture_note"):
        console.print(f"[yellow]note:[/] {plain(doc['capture_note'])}", highlight=False)
    for item in doc["skipped"]:
        console.print(f"[yellow]skipped[/] {item['name']}: {item['reason']}", highlight=False)
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/] {plain(note)}", highlight=False)


FAMILY_LABELS = {"linear_inputs": "linear inputs", "layernorm": "LayerNorm", "activation": "activation functions",
                 "attention": "attention", "other": "other"}


def _family_table(by_family: dict[str, int], total: int) -> Table:
    """Saved-for-backward bytes by op family (measured), with each family's share of the total."""
    table = Table(title="saved for backward, by op family (measured)", title_justify="left")
    table.add_column("op family")
    table.add_column("bytes", justify="right")
    table.add_column("%", justify="right")
    for family, nbytes in by_family.items():
        share = f"{100 * nbytes / total:.1f}%" if total else "n/a"
        table.add_row(FAMILY_LABELS.get(family, family), format_bytes(nbytes), share)
    table.add_row("total", format_bytes(total), "100.0%" if total else "n/a")
    return table


@click.command("analyze")
@model_options
@click.option("--batch-size", type=int, default=8, show_default=True, help="Batch size of the example input.")
@click.option("--input-size", default=None, help="C,H,W of the input (default: the model's).")
@click.option("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99", show_default=True, help="Explained-variance thresholds.")
@click.option("--levers", is_flag=True, help="Also the smallest whole-step training peak each memory lever reaches "
              "(micro-batching, recomputation, activation codes, Tucker inputs, low-rank weights): about 70 small measured steps.")
@click.option("--jactus-data", default=None, help="Also the JACTUS plan that finetune --method jactus would train, on this "
              "data (mnist, digits or an image folder): per layer k_w, k_i, k_o, the union ranks and the energy kept. "
              "Calibrates on --calib-batches batches of 64 training images; trains nothing.")
@click.option("--retain", default=None, help="With --jactus-data: the share of the parameters to keep (default 80%).")
@click.option("--calib-batches", type=int, default=4, show_default=True, help="With --jactus-data: calibration batches.")
@click.option("--json", "json_path", default=None, help="Write the analyze/1 JSON document here ('-' for stdout).")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False), help="Write report.html and its plots into this folder.")
@device_option
@wraps_user_errors
def command(model, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len, batch_size, input_size, thresholds,
            levers, jactus_data, retain, calib_batches, json_path, report_dir, device):
    """Show, per linear layer, how compressible MODEL is and where its training memory goes."""
    from wasi_compress.analysis import analyze

    console = console_for(json_path)
    size = None
    if input_size:
        try:
            size = tuple(int(v) for v in input_size.split(","))
        except ValueError:
            size = ()
        if len(size) != 3 or min(size) < 1:
            raise UserError(f"--input-size: expected C,H,W such as 3,224,224, got {input_size!r}")
    from wasi_compress.outputs import check_paths, lock_outputs, report_html

    jactus = _jactus_config(model, arch, weights, trust_pickle, trust_code, jactus_data, retain, calib_batches, device)
    outputs = {"--json": json_path, "--report": report_html(report_dir)}
    check_paths({"MODEL": model, "--weights": weights}, outputs)
    with lock_outputs(outputs.values()):  # two runs cannot write the same output
        loaded = load_from_options(model, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len)
        with progress_bar(console, "analyzing") as on_progress:
            doc = analyze(loaded, batch_size=batch_size, input_size=size,
                          thresholds=parse_float_list(thresholds, "--thresholds"), device=check_device(device),
                          on_progress=on_progress)
        if levers:  # measured steps of their own, beside the analysis
            from wasi_compress.finetune.memory_budget import memory_levers

            console.print("measuring the memory levers (about 70 small training steps)")
            doc["memory_levers"] = memory_levers(loaded.model, batch_size, size or loaded.input_size, check_device(device))
        if jactus is not None:
            from wasi_compress.finetune.jactus_plan import plan_jactus

            with console.status("JACTUS: calibrating and allocating ranks") as status:
                doc["jactus"] = plan_jactus(jactus, loaded=loaded, on_status=lambda text: status.update(plain(text)))
        render(doc, console)
        if doc.get("jactus"):
            from wasi_compress.cli.finetune import render_jactus

            render_jactus(doc["jactus"], console)
        for path in _write(doc, json_path, report_dir):
            console.print(f"wrote {path}")


def _jactus_config(model, arch, weights, trust_pickle, trust_code, data, retain, calib_batches, device):
    """The finetune settings whose JACTUS plan --jactus-data shows (checked before any work), or None."""
    if data is None:
        if retain is not None:
            raise UserError("--retain applies to the JACTUS plan: add --jactus-data DATA or drop --retain")
        return None
    from wasi_compress.finetune import FinetuneConfig

    return FinetuneConfig(model=model, data=data, method="jactus", retain=retain, calib_batches=calib_batches,
                          device=check_device(device), arch=arch, weights=weights, trust_pickle=trust_pickle,
                          trust_code=trust_code)


def _write(doc: dict, json_path: str | None, report_dir: str | None) -> list:
    """The JSON document and the report folder, all or none (wasi_compress.outputs)."""
    from pathlib import Path

    from wasi_compress.fileio import write_json
    from wasi_compress.outputs import Outputs

    with Outputs() as outputs:
        if json_path:
            outputs.then(lambda: (write_json(json_path, doc), None if json_path == "-" else Path(json_path))[1])
        if report_dir:
            from wasi_compress.report_html import write_report

            outputs.then(lambda: write_report(report_dir, analyze=doc))
        return outputs.commit()
