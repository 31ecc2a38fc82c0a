"""Whole-step memory under a budget (issue 13), side by side in one process, steps run round robin:
vanilla; per-block checkpointing; micro-batching at 4 micro-batches; WASI at its default thresholds; and the
step planner (`finetune --memory-budget`) at 1/4, 1/10 and 1/20 of vanilla's measured peak.

For each row: the measured whole-step peak (live-tensor tracker over forward, backward and the optimizer
step), the planner's predicted peak (planner rows), and the median step time, each also as a ratio to
vanilla. The planner rows are planned once (one set of measurements) and each plan is confirmed by a
measured step, as the command does. Optimizer: SGD lr 0.05 without momentum (the paper's), the same for
every row; the planner rows train L, R with the optimizer-step rule. Inputs are random images and labels.

With ``--accuracy``: fine-tune on digits for 5 epochs at batch 64 over seeds 0, 1, 2, vanilla beside the
planner at 1/10 of vanilla's measured peak (SGD momentum 0.9, lr 0.01 for both), and print held-out
accuracy per seed and mean, and each run's measured peak.

    .venv/bin/python benchmarks/bench_memory_budget.py --model timm:vit_base_patch32_224 --save ...
    .venv/bin/python benchmarks/bench_memory_budget.py --model builtin:mnist-vit --accuracy --save ...
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wasi_compress  # noqa: E402,F401  (before timm)
from wasi_compress.finetune import FinetuneConfig, finetune, measure_step, train_step  # noqa: E402
from wasi_compress.finetune.memory_budget import (  # noqa: E402
    plan_and_check, plan_inputs_for, predict_peak, prepare_with_levers_,
)
from wasi_compress.finetune.steps import after_step_fn, make_run_optimizer  # noqa: E402
from wasi_compress.step_plan import StepLevers  # noqa: E402

FRACTIONS = (4, 10, 20)
SEEDS = (0, 1, 2)
MB = 1e6


def _config(method: str, **more) -> FinetuneConfig:
    # a settings carrier: the benchmark feeds its own batches, so --data is never read; every row steps
    # the optimizer after backward (as a run under --memory-budget does)
    return FinetuneConfig(model="bench", data="random", method=method, lr=0.05, momentum=0.0, step_in_backward=False,
                          **more)


def _row(name, model, config, micro_batches=1, predicted=None, note=""):
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = make_run_optimizer(trained, config, ordinary=True)
    return {"name": name, "model": model, "opt": opt, "after": after_step_fn(model), "m": micro_batches,
            "predicted": predicted, "note": note, "times": []}


def _peak(model, config, x, y, m) -> int:
    twin = copy.deepcopy(model)
    opt = make_run_optimizer([p for p in twin.parameters() if p.requires_grad], config, ordinary=True)
    return measure_step(twin, opt, x, y, linears={}, micro_batches=m)["peak_bytes"]


def build_rows(dense, x, y, emit) -> list[dict]:
    """The fixed rows (each with the memory model's prediction for it), then the planner's."""
    as_is = dict(layernorm="exact", attention="as-is")
    vanilla_cfg = _config("vanilla")
    wasi_cfg = _config("wasi")  # the command's default thresholds and rule, with the benchmark's optimizer
    fixed = (("vanilla", vanilla_cfg, StepLevers(**as_is)),
             ("checkpointing (per block)", vanilla_cfg, StepLevers(recompute=True, **as_is)),
             ("micro-batching, 4 micro-batches", vanilla_cfg, StepLevers(micro_batches=4, **as_is)),
             ("WASI, default thresholds", wasi_cfg, StepLevers(linear_inputs="tucker", **as_is)))
    rows = []
    for name, config, levers in fixed:
        predicted = predict_peak(dense, config, levers, x, y).predicted_peak_bytes
        handle, _ = prepare_with_levers_(copy.deepcopy(dense), config, levers, example=x[:2])
        rows.append(_row(name, handle.model, config, levers.micro_batches, predicted))
    vanilla_peak = _peak(rows[0]["model"], vanilla_cfg, x, y, 1)
    planned_cfg = _config("wasi", update="optimizer-step")
    started = time.perf_counter()
    inputs = plan_inputs_for(copy.deepcopy(dense), planned_cfg, x, y)
    emit(f"planner measurements: {len(inputs.model.fits)} form combinations in {time.perf_counter() - started:.0f} s")
    for fraction in FRACTIONS:
        budget = vanilla_peak // fraction

        def build(step, keep=[]):  # noqa: B006  (the last model built is the one kept)
            keep[:] = [prepare_with_levers_(copy.deepcopy(dense), planned_cfg, step.levers, example=x[:2],
                                            weight_ranks=step.weight_ranks)[0].model]
            return _peak(keep[0], planned_cfg, x, y, step.levers.micro_batches), keep[0]

        try:
            step, model = plan_and_check(inputs, budget, build, f"budget 1/{fraction} ({budget / MB:.1f} MB)")
        except Exception as exc:  # an infeasible fraction is a row too
            emit(f"planner, 1/{fraction} of vanilla: {exc}")
            continue
        lv = step.levers
        ranks = [r for r in step.weight_ranks.values() if r is not None]
        note = (f"planner 1/{fraction}: {lv.micro_batches} micro-batches, recompute {'on' if lv.recompute else 'off'}, "
                f"activation {lv.activation}, linear inputs {lv.linear_inputs}, {len(ranks)} of "
                f"{len(step.weight_ranks)} planned linears low-rank, error proxy {step.error['total']:.3f}")
        rows.append(_row(f"planner, 1/{fraction} of vanilla", model, planned_cfg, lv.micro_batches,
                         step.predicted_peak_bytes, note))
    return rows


def run_rows(rows, x, y, warmup: int, steps: int, emit) -> None:
    for i in range(warmup + steps):  # round robin: load on the shared machine hits every row alike
        for row in rows:
            start = time.perf_counter()
            train_step(row["model"], row["opt"], x, y, row["after"], row["m"])
            if i >= warmup:
                row["times"].append(time.perf_counter() - start)
            row["opt"].zero_grad(set_to_none=True)
    header = f"{'configuration':<34} {'peak MB':>9} {'x':>6} {'predicted MB':>13} {'pred/meas':>9} {'step s':>8} {'x':>6}"
    emit(header)
    emit("-" * len(header))
    base_peak = base_step = None
    for row in rows:
        peak = measure_step(row["model"], row["opt"], x, y, linears={}, warmup=False, micro_batches=row["m"])["peak_bytes"]
        step = statistics.median(row["times"])
        base_peak, base_step = base_peak or peak, base_step or step
        pred = row["predicted"]
        emit(f"{row['name']:<34} {peak / MB:>9.1f} {peak / base_peak:>6.3f} "
             f"{(f'{pred / MB:.1f}' if pred else '-'):>13} {(f'{pred / peak:.3f}' if pred else '-'):>9} "
             f"{step:>8.2f} {step / base_step:>6.2f}   [{' '.join(f'{t:.2f}' for t in row['times'])}]")
    for row in rows:
        if row["note"]:
            emit(row["note"])


def accuracy(model_spec: str, emit) -> None:
    """Vanilla, then the planner at 1/10 of vanilla's measured peak (its own run's, same optimizer)."""
    recipe = {"momentum": 0.9, "lr": 0.01}

    def runs(**kw):
        docs = [finetune(FinetuneConfig(model=model_spec, data="digits", epochs=5, batch_size=64, seed=s, **recipe,
                                        **kw)).doc for s in SEEDS]
        return docs, [d["final"]["accuracy"] * 100 for d in docs]

    vanilla, vanilla_acc = runs(method="vanilla")
    budget = vanilla[0]["memory_vanilla"]["peak_bytes"] // 10
    emit(f"\n## accuracy: {model_spec} -> digits, 5 epochs, batch 64, SGD momentum 0.9 lr 0.01 (both), seeds "
         f"{list(SEEDS)}; budget = 1/10 of vanilla's measured peak ({vanilla[0]['memory_vanilla']['peak_bytes']} "
         f"bytes) = {budget} bytes")
    planned, planned_acc = runs(method="wasi", update="optimizer-step", memory_budget=budget)
    for name, docs, accs, key in (("vanilla", vanilla, vanilla_acc, "memory_vanilla"),
                                  ("planner 1/10", planned, planned_acc, "memory")):
        peaks = [d[key]["peak_bytes"] for d in docs]
        emit(f"{name:<14} " + " ".join(f"{a:6.2f}" for a in accs) + f"  mean {statistics.mean(accs):6.2f}  "
             f"measured peak {max(peaks) / MB:.1f} MB (max over seeds)  median step "
             f"{statistics.median(d['step_time_median_s'] for d in docs):.2f} s")
    emit(f"gap (vanilla - planner): {statistics.mean(vanilla_acc) - statistics.mean(planned_acc):.2f} points; "
         f"every planned run's measured peak under the budget: {all(d['memory']['peak_bytes'] <= budget for d in planned)}")


def load_batch(model_spec: str, batch_size: int):
    """The model and the benchmark's random batch (images and labels, seed 0)."""
    from wasi_compress.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(model_spec)
    c, h, w = loaded.input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, c, h, w, generator=g)
    y = torch.randint(0, loaded.num_classes or 10, (batch_size,), generator=g)
    return loaded, x, y


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_base_patch32_224")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true", help="also the digits accuracy of vanilla and 1/10")
    parser.add_argument("--save", default=None, help="also write the output here, the command on the first line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    loaded, x, y = load_batch(args.model, args.batch_size)
    _, h, w = loaded.input_size
    emit(f"model {args.model}, batch {args.batch_size}, {h}x{w} px, {torch.get_num_threads()} threads, torch "
         f"{torch.__version__}, {args.warmup} warm-up + {args.steps} timed steps, SGD lr 0.05 (no momentum)")
    emit("peak = measured live tensor bytes over forward+backward+step; predicted = the planner's memory model; "
         "ratios (x) to vanilla")
    rows = build_rows(loaded.model, x, y, emit)
    run_rows(rows, x, y, args.warmup, args.steps, emit)
    if args.accuracy:
        accuracy(args.model, emit)
    if args.save:
        command = "$ .venv/bin/python benchmarks/bench_memory_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.save).write_text("\n".join([command, *lines]) + "\n")


if __name__ == "__main__":
    main()
