"""One training step, side by side in one process: vanilla, per-block activation checkpointing, ASI, and
WASI with both update rules, with ranks from eps = 0.8 and from a fixed 25% of full rank.

For each configuration: median wall time of the timed steps (after warm-up), the measured whole-step
peak of live tensor bytes (wasi_compress.measure.LiveTensorBytes over forward, backward and the SGD
step), the saved activations (saved_tensors_hooks, each storage once) and the paper's scope (weights and
saved inputs of the MLP linears), each also as a ratio to vanilla. Memory is measured on one extra step
after the timed ones, so the tracker's overhead never enters the timings. All models are built first and the
steps run round robin (step 1 of every configuration, then step 2, ...), so that load from other processes
on a shared machine falls on all configurations alike.

"eps = 0.8": weight rank explaining 80% of each weight's energy (a layer above break-even keeps its dense
weight, as `wasi-compress finetune` does) and Tucker ranks explaining 80% of each saved input's energy
per mode, chosen on the first step. "25%": weight rank = 25% of min(out, in), Tucker ranks = 25% of
every mode of the saved input (batch, tokens, channels). timm models are created with pretrained=False
(nothing is downloaded), so weights are random: their spectra are flat and eps = 0.8 gives high ranks;
the 25% rows stand for the low ranks of pretrained weights. Inputs are random images, labels random.
Optimizer: SGD, lr 0.05, no momentum (the paper's).

    .venv/bin/python benchmarks/bench_train_step.py --save benchmarks/bench_train_step.txt
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wasi_compress  # noqa: E402,F401  (before timm)
from wasi_compress.finetune import after_step_fn as _after_step_fn, measure_step, train_step  # noqa: E402
from wasi_compress.modules.training import WASILinear  # noqa: E402
from wasi_compress.passes.capture import capture  # noqa: E402
from wasi_compress.passes.training import TrainingPass  # noqa: E402

CONFIGS = (
    ("vanilla", dict(method="vanilla")),
    ("checkpointing (per block)", dict(method="vanilla", checkpointing=True)),
    ("ASI, eps 0.8", dict(method="asi", ranks="eps")),
    ("ASI, 25% ranks", dict(method="asi", ranks="25%")),
    ("WASI subspace-iteration, eps 0.8", dict(method="wasi", update="subspace-iteration", ranks="eps")),
    ("WASI subspace-iteration, 25% ranks", dict(method="wasi", update="subspace-iteration", ranks="25%")),
    ("WASI optimizer-step, threshold 0.8", dict(method="wasi", update="optimizer-step", ranks="eps")),
    ("WASI optimizer-step, 25% ranks", dict(method="wasi", update="optimizer-step", ranks="25%")),
)
LR = 0.05


def build(model_spec: str, example: torch.Tensor, cfg: dict):
    from wasi_compress.loading import load_model

    torch.manual_seed(0)
    model = load_model(model_spec).model
    cap = capture(model, example[:2])
    model = cap.model
    if cfg.get("checkpointing"):
        model.set_grad_checkpointing(True)
    method = cfg["method"]
    if method == "vanilla":
        return model, cap, ""
    kwargs = dict(method=method, update=cfg.get("update", "subspace-iteration"), threshold=0.8, activation_threshold=0.8)
    if kwargs["update"] == "subspace-iteration" and method == "wasi":
        kwargs["lr"] = LR
    training = TrainingPass(cap, **kwargs)
    if cfg["ranks"] == "25%":
        sites = training.selected_sites()
        batch = example.shape[0]
        training.weight_ranks = {s.name: max(1, min(s.in_features, s.out_features) // 4) for s in sites}
        training.activation_ranks = {s.name: [max(1, math.ceil(d / 4)) for d in (batch, *s.input_shape[1:])] for s in sites}
    model = training(model).graph_module
    wasi = [m for m in model.modules() if isinstance(m, WASILinear)]
    dense = sum(1 for layer in training.layers if layer.module == "asi") if method == "wasi" else 0
    info = ""
    if wasi:
        frac = statistics.mean(m.rank / min(m.in_features, m.out_features) for m in wasi)
        info = f"{len(wasi)} WASI layers, mean rank {frac:.0%} of full"
        if dense:
            info += f", {dense} above break-even kept dense"
    return model, cap, info


def run(args) -> list[str]:
    torch.set_num_threads(args.threads)
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)
    emit(f"model {args.model}, batch {args.batch_size}, {args.img_size} px, {torch.get_num_threads()} threads, "
         f"torch {torch.__version__}, {args.warmup} warm-up + {args.steps} timed steps, SGD lr {LR} (no momentum)")
    emit("peak = measured live tensor bytes over forward+backward+step; saved = saved_tensors_hooks; "
         "paper scope = fc1/fc2 weights + saved inputs (the paper's analytic scope, measured here)")
    emit()
    header = f"{'configuration':<36} {'step s':>8} {'x vanilla':>9} {'peak MB':>9} {'x':>6} {'saved MB':>9} {'x':>6} {'paper MB':>9} {'x':>6}"
    emit(header)
    emit("-" * len(header))
    selected = [c for c in CONFIGS if not args.only or any(o.lower() in c[0].lower() for o in args.only)]
    runs = []
    for name, cfg in selected:  # every model is built first, so the timed steps can interleave
        model, cap, info = build(args.model, x, cfg)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        runs.append({"name": name, "model": model, "opt": opt, "after": _after_step_fn(model), "info": info,
                     "linears": {s.name: s.role for s in cap.sites if s.kind == "module"}, "times": []})
    # Round robin: step 1 of every configuration, then step 2 of every configuration, ... so that a burst
    # of load on the shared machine hits all configurations alike instead of whichever runs at that moment.
    for i in range(args.warmup + args.steps):
        for run in runs:
            start = time.perf_counter()
            train_step(run["model"], run["opt"], x, y, run["after"])
            if i >= args.warmup:
                run["times"].append(time.perf_counter() - start)
            run["opt"].zero_grad(set_to_none=True)  # only one configuration's gradients alive at a time
    results = {}
    infos = []
    for run in runs:
        name = run["name"]
        mem = measure_step(run["model"], run["opt"], x, y, linears=run["linears"], warmup=False)
        step = statistics.median(run["times"])
        results[name] = (step, mem)
        base_step, base = results[runs[0]["name"]]
        mb = 1e6
        emit(f"{name:<36} {step:>8.2f} {step / base_step:>9.2f} {mem['peak_bytes'] / mb:>9.1f} "
             f"{mem['peak_bytes'] / base['peak_bytes']:>6.2f} {mem['saved_activation_bytes'] / mb:>9.1f} "
             f"{mem['saved_activation_bytes'] / base['saved_activation_bytes']:>6.2f} {mem['paper_scope_bytes'] / mb:>9.1f} "
             f"{mem['paper_scope_bytes'] / base['paper_scope_bytes']:>6.3f}   [{' '.join(f'{t:.2f}' for t in run['times'])}]")
        if run["info"]:
            infos.append(f"{name}: {run['info']}")
        run["model"] = run["opt"] = None
        gc.collect()
    emit()
    emit("ratios (x) are to vanilla; step s = median of the timed steps (each listed in brackets), which ran round")
    emit("robin across the configurations, so changes in the shared machine's load hit all of them alike")
    for info in infos:
        emit(info)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_base_patch32_224")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="run only configurations whose name contains one of these")
    parser.add_argument("--save", default=None, help="also write the output here, the command on the first line")
    args = parser.parse_args(argv)
    lines = run(args)
    if args.save:
        command = "$ .venv/bin/python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.save).write_text("\n".join([command, *lines]) + "\n")


if __name__ == "__main__":
    main()
