"""`wasi-compress finetune MODEL --data mnist|digits|DIR|text:FILE|stdlib-docs`: fine-tune in the weight subspace with compressed
activations, within an activation budget, and show the measured memory and time against ordinary
fine-tuning. Thin: options -> wasi_compress.finetune.finetune -> progress, tables, JSON, report.

Under torchrun the same command trains with DDP (optimizer-step rule; gloo on CPU)::

    torchrun --nproc-per-node 2 .venv/bin/wasi-compress finetune builtin:mnist-vit --data digits \\
        --method wasi --update optimizer-step -o out/ddp.safetensors
"""

from __future__ import annotations

from collections import Counter

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wasi_compress.cli._common import check_device, console_for, device_option, model_options, plain, wraps_user_errors
from wasi_compress.units import format_bytes

_MEMORY_ROWS = (
    ("peak_bytes", "peak, whole step"),
    ("saved_activation_bytes", "saved activations"),
    ("linear_layers_bytes", "linear layers (weights+grads+state+inputs)"),
    ("paper_scope_bytes", "paper scope (MLP weights + inputs)"),
    ("params_bytes", "parameters"),
    ("grads_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"),
)


def render(doc: dict, console) -> None:
    memory, vanilla = doc.get("memory"), doc.get("memory_vanilla")
    if memory:
        table = Table(title=f"one training step at batch {doc['batch_size']}: {doc['method']} beside vanilla (measured)",
                      title_justify="left")
        table.add_column("")
        table.add_column(doc["method"], justify="right")
        table.add_column("vanilla", justify="right")
        table.add_column("ratio", justify="right")
        for key, label in _MEMORY_ROWS:
            ours, theirs = memory.get(key), (vanilla or {}).get(key)
            ratio = f"{theirs / ours:.1f}x less" if ours and theirs and ours < theirs else (
                f"{ours / theirs:.2f}x" if ours and theirs else "")
            table.add_row(label, format_bytes(ours) if ours is not None else "n/a",
                          format_bytes(theirs) if theirs is not None else "n/a", ratio)
        console.print(table)
    plan = doc.get("memory_plan")
    if plan:
        measured = (memory or {}).get("peak_bytes")
        levers = plan["levers"]
        console.print(f"memory budget {format_bytes(plan['budget_bytes'])}: predicted peak "
                      f"{format_bytes(plan['predicted']['peak'])}, measured {format_bytes(measured) if measured else 'n/a'}; "
                      f"{levers['micro_batches']} micro-batches, recompute {'on' if levers['recompute'] else 'off'}, "
                      f"activation {levers['activation']}, linear inputs {levers['linear_inputs']}, "
                      f"frozen parameters {levers.get('frozen_dtype', 'float32')}, "
                      f"error proxy {plan['error']['total']:.3f}", highlight=False)
    if doc.get("step_time_median_s") is not None:
        console.print(f"median step time: {doc['step_time_median_s'] * 1000:.1f} ms")
    console.print(f"final held-out accuracy: {doc['final']['accuracy']:.2%}")
    kinds = Counter(layer["module"] for layer in doc.get("layers") or [])
    if kinds:  # so a run that replaced nothing is visible at a glance
        console.print(f"linear layers: {', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}", highlight=False)
    if doc.get("activation_plan"):
        planning = doc.get("activation_planning") or {}
        console.print(f"activation plan: {format_bytes(planning.get('total_cost_bytes', 0))} of "
                      f"{format_bytes(planning.get('budget_bytes', 0))} budget, total relative gradient error "
                      f"{planning.get('total_error', 0):.3f}")
    if doc.get("jactus"):
        render_jactus(doc["jactus"], console)
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/] {plain(note)}", highlight=False)


def render_jactus(plan: dict, console) -> None:
    """Per layer the truncation ranks, the union ranks and what they keep; the allocation beside the DP's."""
    table = Table(title="JACTUS: ranks per layer (k_w weight, k_i input, k_o gradient; union Q_L x Q_R)",
                  title_justify="left")
    for column in ("layer", "role", "k_w", "k_i", "k_o", "Q_L", "Q_R", "params", "weight energy", "gradient energy"):
        table.add_column(column, justify="left" if column in ("layer", "role") else "right")
    for layer in plan["layers"]:
        c = layer["chosen"]
        table.add_row(plain(layer["name"]), layer["role"], str(c["k_w"]), str(c["k_i"]), str(c["k_o"]), str(c["k_left"]),
                      str(c["k_right"]), f"{c['params']:,}", f"{c['weight_energy']:.3f}", f"{c['gradient_energy']:.3f}")
    console.print(table)
    line = f"JACTUS: {plan['result_params']:,} of {plan['original_params']:,} parameters kept ({plan['retained']:.1%})"
    if plan.get("greedy"):
        g, d = plan["greedy"], plan["dp"]
        line += (f"; greedy allocation gain {g['total_gain']:.4f} in {g['total_params']:,} parameters, exact DP on the "
                 f"same candidates {d['total_gain']:.4f} in {d['total_params']:,} ({plan['applied']} applied)")
    console.print(line, highlight=False)


@click.command("finetune")
@model_options
@click.option("--data", required=True, help="Images: mnist, digits, or an image folder (one subfolder per class). "
              "Text (for a text model): text:FILE, one example a line as label<TAB>sentence, 20% of each label held "
              "out by a fixed seed; text:TRAIN,TEST with a held-out file of the same form; or stdlib-docs, sentences "
              "of the standard library's docstrings labelled by module family. Tokenized with the model's "
              "tokenizer.json to --seq-len tokens.")
@click.option("--method", type=click.Choice(["wasi", "asi", "vanilla", "jactus"]), default="wasi", show_default=True,
              help="wasi: weight subspace + compressed activations; asi: compressed activations; vanilla: ordinary; "
                   "jactus: compress to --retain and adapt in one go (task-aware union subspaces, only the cores train).")
@click.option("--retain", default=None, help="jactus: the share of the model's parameters to keep, e.g. 80% or 0.8 "
              "[default: 80%].")
@click.option("--budget", default=None, help="jactus: bytes of all parameters of the result in float32 (units as "
              "convert's --budget, e.g. 8MB), instead of --retain.")
@click.option("--calib-batches", type=int, default=4, show_default=True,
              help="jactus: training batches its input and gradient covariances are estimated on.")
@click.option("--update", type=click.Choice(["subspace-iteration", "optimizer-step", "factored"]), default="optimizer-step",
              show_default=True, help="WASI training rule: optimizer-step: L, R stepped by the optimizer and re-orthonormalised "
                   "(momentum, AdamW, DDP); or the paper's subspace iteration inside backward (plain SGD). 'factored' is the "
                   "old name of optimizer-step.")
@click.option("--threshold", type=float, default=None, help="Explained variance of each weight's subspace "
              "(default 0.6; 0.95 for text models, whose pretrained spectra need more; the paper uses 0.8).")
@click.option("--activation-threshold", type=float, default=0.98, show_default=True,
              help="Explained variance of each saved input's Tucker ranks (without --activation-budget).")
@click.option("--activation-budget", default=None, help="Bytes for the saved inputs of the compressed layers (e.g. 2MB); "
              "plans per-layer Tucker ranks on a calibration batch.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Global batch (split across DDP processes).")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.01 for sgd with momentum (0.03 for "
              "jactus, which trains only its cores), 0.05 without, 3e-4 for adamw]; "
              "subspace-iteration layers use it for their in-backward SGD update.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning rate per step: cosine decay from --lr over the run, or constant.")
@click.option("--momentum", type=float, default=None,
              help="SGD momentum [default: 0.9; the paper's SGD has none: --momentum 0].")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--step-in-backward/--no-step-in-backward", default=None, help="Run each parameter's optimizer step inside "
              "backward as soon as its gradient is ready, and drop the gradient: gradients never all exist at once "
              "[default: on where it can run: one process, no --micro-batches, no --memory-budget].")
@click.option("--memory-budget", default=None, help="Fit the whole training step's measured peak under this many bytes "
              "(e.g. 200MB; units as --budget): plans micro-batches, recomputation, saved-tensor forms and weight ranks.")
@click.option("--micro-batches", type=int, default=1, show_default=True,
              help="Run each batch as this many chunks whose gradients accumulate (same gradient, less memory).")
@click.option("--recompute", is_flag=True, help="Per-block recomputation: keep each block's input, re-run it in backward.")
@click.option("--finetune-last", type=int, default=None, help="Train only the last N blocks (and what follows them).")
@click.option("--frozen-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Store what --finetune-last freezes in this dtype (bfloat16: half the bytes, weights rounded once).")
@click.option("--allow-unchanged", is_flag=True,
              help="Go on when --method wasi/asi would replace no layer (it then trains as vanilla); refused without it.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.resume.pt to the same result as an uninterrupted run.")
@click.option("-o", "--output", default=None, help="Checkpoint (.safetensors) written after every epoch; loads as MODEL.")
@click.option("--json", "json_path", default=None, help="Write the finetune/1 JSON document here ('-' for stdout).")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False), help="Write report.html and plots here.")
@device_option
@wraps_user_errors
def command(model, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len, data, method, retain, budget,
            calib_batches, update, threshold,
            activation_threshold, activation_budget, epochs, batch_size, lr, optimizer, schedule, momentum, weight_decay,
            step_in_backward, memory_budget, micro_batches, recompute, finetune_last, frozen_dtype, allow_unchanged, seed, resume, output, json_path,
            report_dir, device):
    """Fine-tune MODEL on --data in its weight subspace with compressed activations, and measure memory and
    time against ordinary fine-tuning."""
    from wasi_compress.finetune import FinetuneConfig, finetune

    import os

    console = console_for(json_path)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 talks
    config = FinetuneConfig(
        model=model, data=data, method=method, update=update, threshold=threshold,
        activation_threshold=activation_threshold, activation_budget=activation_budget, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule, momentum=momentum, weight_decay=weight_decay,
        step_in_backward=step_in_backward, memory_budget=memory_budget, micro_batches=micro_batches,
        recompute=recompute, finetune_last=finetune_last, frozen_dtype=frozen_dtype, allow_unchanged=allow_unchanged, seed=seed, resume=resume, output=output,
        json_path=json_path, report_dir=report_dir, device=check_device(device), arch=arch, weights=weights,
        trust_pickle=trust_pickle, trust_code=trust_code, num_classes=num_classes, img_size=img_size, seq_len=seq_len,
        retain=retain, budget=budget, calib_batches=calib_batches)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"), TimeElapsedColumn(),
                  console=console, transient=False, disable=quiet) as progress:
        status = progress.add_task("preparing", total=None, loss="-", acc="-")
        tasks: dict[int, int] = {}

        def on_status(text: str) -> None:
            progress.update(status, description=text)

        def on_step(epoch: int, step: int, steps: int, loss: float, acc: float) -> None:
            if status in progress.task_ids:
                progress.remove_task(status)
            if epoch not in tasks:
                tasks[epoch] = progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss="-", acc="-")
            progress.update(tasks[epoch], completed=step, loss=f"{loss:.4f}", acc=f"{acc:.2%}")

        def on_epoch(epoch: int, record: dict) -> None:
            if epoch in tasks:
                progress.update(tasks[epoch], acc=f"{record['train_accuracy']:.2%} train, {record['accuracy']:.2%} held-out")

        result = finetune(config, on_step=on_step, on_epoch=on_epoch, on_status=on_status)
        if status in progress.task_ids:
            progress.remove_task(status)

    if quiet:
        return
    render(result.doc, console)
    if output:
        console.print(f"wrote {output} (resume state: {output}.resume.pt)")
    if json_path and json_path != "-":
        console.print(f"wrote {json_path}")
    if report_dir:
        console.print(f"wrote {report_dir}/report.html")
