"""The memory model's prediction beside the measured peak for two rows of `bench_memory_budget.py` on
ViT-B/32 (batch 64), without the whole benchmark's hour of measurements: per-block checkpointing, and the
planner at 1/10 of vanilla's peak restricted to the lever combination the full run chose (8 micro-batches,
recomputation, 8-bit GELU codes, exact linear inputs). Used to check a memory-model fix between full runs.

    .venv/bin/python benchmarks/recheck_memory_model.py --save benchmarks/recheck_memory_model.txt
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_memory_budget as bench  # noqa: E402
from wasi_compress.finetune import memory_budget  # noqa: E402
from wasi_compress.step_plan import StepLevers  # noqa: E402
from wasi_compress.transforms.training import prepare_training_  # noqa: E402

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_base_patch32_224")
    parser.add_argument("--save", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"$ .venv/bin/python benchmarks/recheck_memory_model.py{' --save ' + args.save if args.save else ''}"]

    def emit(text):
        print(text, flush=True)
        lines.append(text)

    loaded, x, y = bench.load_batch(args.model, 64)
    dense = loaded.model
    vanilla = bench._config("vanilla")
    plain, _ = memory_budget.prepare_with_levers_(copy.deepcopy(dense), vanilla, StepLevers(layernorm="exact",
                                                  attention="as-is"), example=x[:2])
    vanilla_peak = bench._peak(plain.model, vanilla, x, y, 1)
    emit(f"vanilla: measured {vanilla_peak / 1e6:.1f} MB")
    levers = StepLevers(recompute=True, layernorm="exact", attention="as-is")
    predicted = memory_budget.predict_peak(dense, vanilla, levers, x, y).predicted_peak_bytes
    handle, _ = memory_budget.prepare_with_levers_(copy.deepcopy(dense), vanilla, levers, example=x[:2])
    peak = bench._peak(handle.model, vanilla, x, y, 1)
    emit(f"checkpointing (per block): predicted {predicted / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB, "
         f"pred/meas {predicted / peak:.3f}")
    config = bench._config("wasi", update="optimizer-step")
    levers = StepLevers(8, True, "code8", "exact")
    prepared = prepare_training_(copy.deepcopy(dense), config.wasi_config(), example=x[:2])
    inputs = memory_budget.measure_plan_inputs(dense, prepared.model, prepared, config, x, y, options=[levers],
                                               errors=False)
    budget = vanilla_peak // 10
    step = inputs.plan(int(budget * (1 - memory_budget.PLAN_MARGIN)))
    planned, _ = memory_budget.prepare_with_levers_(copy.deepcopy(dense), config, levers, example=x[:2],
                                                    weight_ranks=step.weight_ranks)
    peak = bench._peak(planned.model, config, x, y, levers.micro_batches)
    emit(f"planner 1/10 ({budget / 1e6:.1f} MB), its levers fixed: predicted {step.predicted_peak_bytes / 1e6:.1f} MB, "
         f"measured {peak / 1e6:.1f} MB, pred/meas {step.predicted_peak_bytes / peak:.3f}, under the budget: {peak <= budget}")
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
