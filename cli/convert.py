"""`wasi-compress convert MODEL --budget 50MB -o OUT`: the most faithful low-rank model that fits the budget.
Thin: options -> wasi_compress.convert.ConvertConfig -> convert() -> summary tables."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from wasi_compress.cli._common import (
    format_count as _count,
    console_for, device_option, load_from_options, model_options, plain, progress_bar, wraps_user_errors,
)
from wasi_compress.units import format_bytes


def _change(new, old) -> str:
    return f"{(new - old) / old * 100:+.1f}%" if new is not None and old else ""


def render(doc: dict, console) -> None:
    table = Table(title=f"{doc['model']}: rank per linear layer ({doc['allocator']} allocator, {doc['objective']} objective)",
                  title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("rel. error", justify="right")
    for layer in doc["layers"]:
        table.add_row(layer["name"], "dense" if layer["rank"] is None else str(layer["rank"]),
                      format_bytes(layer["bytes"]), f"{layer['error']:.4f}")
    console.print(table)

    summary = Table(title=f"budget {format_bytes(doc['budget_bytes'])} ({doc['budget_bytes']:,} bytes, {doc['dtype']})",
                    title_justify="left")
    summary.add_column("")
    summary.add_column("original", justify="right")
    summary.add_column("converted", justify="right")
    summary.add_column("change", justify="right")
    summary.add_row("parameter bytes", format_bytes(doc["original_bytes"]), format_bytes(doc["total_bytes"]),
                    _change(doc["total_bytes"], doc["original_bytes"]))
    summary.add_row("parameters", _count(doc["params"]["original"]), _count(doc["params"]["converted"]),
                    _change(doc["params"]["converted"], doc["params"]["original"]))
    summary.add_row("FLOPs (fvcore, 1 MAC = 1)", _count(doc["flops"]["original"]), _count(doc["flops"]["converted"]),
                    _change(doc["flops"]["converted"], doc["flops"]["original"]))
    if doc.get("accuracy"):
        acc = doc["accuracy"]
        summary.add_row(f"top-1 on {acc['dataset']}", f"{acc['original']:.2%}", f"{acc['converted']:.2%}",
                        f"{(acc['converted'] - acc['original']) * 100:+.2f} pt")
    console.print(summary)
    dense = sum(layer["rank"] is None for layer in doc["layers"])
    console.print(f"{len(doc['layers']) - dense} layers factored, {dense} kept dense; total relative error "
                  f"{doc['total_error']:.4f}; grid {doc['resolution_bytes']} B, worst-case slack {doc['max_slack_bytes']} B",
                  highlight=False)
    if doc.get("file_bytes") is not None:
        console.print(f"checkpoint file: {doc['file_bytes']:,} bytes ({doc['file_bytes'] / doc['budget_bytes']:.2%} of the budget)",
                      highlight=False)
    if doc.get("onnx"):
        console.print(f"ONNX: {doc['onnx']['path']}, max abs difference from torch {doc['onnx']['max_abs_diff']:.3g} "
                      f"({doc['onnx'].get('rel_diff', float('nan')):.3g} of the output's scale)", highlight=False)
    for item in doc.get("skipped", []):
        console.print(f"[yellow]skipped[/] {item['name']}: {item['reason']}", highlight=False)
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/] {plain(note)}", highlight=False)


@click.command("convert")
@model_options
@click.option("--budget", required=True, help="Bytes of all parameters of the converted model in --dtype: 50MB, 12MiB, 1000000.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The converted model (.safetensors).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Stored dtype; the budget counts bytes in it.")
@click.option("--allocator", type=click.Choice(["dp", "greedy"]), default="dp", show_default=True,
              help="dp: exact knapsack on a byte grid; greedy: error drop per byte.")
@click.option("--objective", type=click.Choice(["weight", "data"]), default="weight", show_default=True,
              help="weight: relative weight error (no data); data: relative output error on --calib images (whitened).")
@click.option("--calib", default=None, help="Calibration data for --objective data: mnist, digits, a folder, random; "
              "for a text model a text file, one sentence a line.")
@click.option("--calib-batches", type=int, default=None,
              help="Calibration batches of 32 (default: 8 of images; every line of a text file, at most 4096).")
@click.option("--rank-multiple", type=int, default=1, show_default=True, help="Round ranks up to a multiple of this.")
@click.option("--rank-grid", type=int, default=32, show_default=True,
              help="Evenly spaced candidate ranks per layer, from 1 to its break-even rank.")
@click.option("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99", show_default=True,
              help="Explained-variance thresholds whose ranks are candidates (besides a grid up to break-even).")
@click.option("--convs", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Low-rank convolutions (a rank-r kxk conv then a 1x1) as planner candidates: auto = only when the "
                   "linears alone cannot reach the budget.")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Token embedding tables are planner candidates too (low-rank E ~ A B: a gather, then a small matmul).")
@click.option("--error-scale", type=click.Choice(["auto", "layer", "model"]), default="auto", show_default=True,
              help="Plan on each layer's own relative error, or on its estimated effect on the model's output (measured on "
                   "a calibration batch; --objective data). auto: model when an embedding is a candidate.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(dir_okay=False), help="Also export ONNX here, checked against torch.")
@click.option("--json", "json_path", default=None, help="Write the convert/1 JSON document here ('-' for stdout).")
@click.option("--eval", "eval_data", default=None, help="Top-1 accuracy before and after on this set's test split: mnist, digits or a folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample and example input.")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False), help="Write report.html and its plots into this folder.")
@device_option
@wraps_user_errors
def command(model, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len, budget, output, dtype, allocator, objective,
            calib, calib_batches, rank_multiple, rank_grid, thresholds, convs, embeddings, error_scale, onnx_path, json_path,
            eval_data, seed,
            report_dir, device):
    """Convert MODEL to low rank within --budget bytes, keeping it as faithful as possible."""
    from wasi_compress.architectures import checkpoint_source
    from wasi_compress.convert import ConvertConfig, convert

    console = console_for(json_path)
    config = ConvertConfig(budget=budget, dtype=dtype, allocator=allocator, objective=objective, calib=calib,
                           calib_batches=calib_batches, rank_multiple=rank_multiple, rank_grid=rank_grid,
                           thresholds=thresholds, convs=convs, embeddings=embeddings, error_scale=error_scale, seed=seed,
                           eval=eval_data, output=output, onnx=onnx_path,
                           json=json_path, report=report_dir, device=device)
    from wasi_compress.convert.job import data_folders, output_paths
    from wasi_compress.outputs import check_paths

    from wasi_compress.hf import model_folder

    check_paths({"MODEL": model, "--weights": weights}, output_paths(config),
                {**data_folders(config), "MODEL": model_folder(model)})  # before any work
    loaded = load_from_options(model, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len)
    source = None if loaded.metadata else checkpoint_source(model, arch=arch, num_classes=num_classes, img_size=img_size)
    # progress on stderr: stdout only ever carries results (and stays empty on an error)
    with progress_bar(Console(stderr=True), "converting") as on_progress:
        result = convert(loaded, config, on_progress=on_progress, source=source)
    render(result.report, console)
    for path in result.files:
        console.print(f"wrote {path}", highlight=False)
