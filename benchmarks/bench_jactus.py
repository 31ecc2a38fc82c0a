"""JACTUS beside its peers (issue 9): builtin:mnist-vit fine-tuned for 5 epochs at batch 64, seeds 0, 1, 2,
on the two tasks of bench_transfer.py (digits; mnist-rot, built by its `build_mnist_rot`).

Rows (every one through the finetune job at the command's defaults: SGD momentum 0.9, cosine, peak lr 0.01,
0.03 for jactus; a row named ROW-lrX ran at peak lr X, e.g. jactus-80-lr0.01, lora-lr0.03):
- vanilla: full fine-tuning;
- lora, dora: peft adapters (rank 8, lora_alpha 16, no dropout) on every block linear (qkv, proj, fc1,
  fc2), the head trainable, everything else frozen; deployed merged, so at the original size;
- ctf-R: compress then fine-tune: `convert` (data objective, calibrated on the task's training split)
  at R of the model's stored parameters, then vanilla fine-tuning of its factors (and everything else);
- wasi: the command's defaults;
- jactus-R: --method jactus --retain R (calibration: the command's default batches).
Columns: held-out accuracy per seed and mean; deployed parameters (what a checkpoint of the trained model
stores, all tensors); the measured whole-step training peak (live tensor tracker); median step time.

Every run is appended to a JSON-lines file (--runs), and a run already there is not repeated, so the
table can be built over several invocations; the table is printed from that file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_jactus.py --tasks digits,mnist-rot [--rows ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import wasi_compress  # noqa: F401  (before timm and peft: the torchvision shim)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transfer import build_mnist_rot  # noqa: E402  (reused: the same mnist-rot task)

MODEL = "builtin:mnist-vit"
SEEDS = (0, 1, 2)
ROWS = ("vanilla", "lora", "dora", "ctf-80", "wasi", "jactus-80", "jactus-60", "jactus-40")
LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
RUNS = Path(__file__).with_name("bench_jactus_runs.jsonl")


def stored_params(model) -> int:
    from wasi_compress.transforms.jactus import stored_params as count

    return count(model)


def run_row(row: str, seed: int, data: str, calib: str, work: Path) -> dict:
    """One fine-tuning run of `row`; returns its measured figures."""
    from wasi_compress.finetune import FinetuneConfig, finetune
    from wasi_compress.loading import load_model
    from wasi_compress.transforms.training import to_inference_

    # the step is measured once per row (seed 0): the machine is shared, and the peak does not depend on the seed
    base = dict(data=data, epochs=5, batch_size=64, seed=seed, measure_memory=seed == SEEDS[0])
    row, _, lr = row.partition("-lr")  # e.g. lora-lr0.03: a row at another peak learning rate
    base["lr"] = float(lr) if lr else None
    loaded, extra = None, {}
    if row == "vanilla":
        config = FinetuneConfig(model=MODEL, method="vanilla", **base)
    elif row in ("lora", "dora"):
        loaded = load_model(MODEL)
        extra["trainable"] = add_adapters(loaded.model, dora=row == "dora")
        config = FinetuneConfig(model=MODEL, method="vanilla", **base)
    elif row.startswith("ctf-"):
        converted = work / f"ctf-{row[4:]}-{Path(calib).name}-{seed}.safetensors"
        if not converted.exists():
            convert_at(float(row[4:]) / 100, calib, converted)
        config = FinetuneConfig(model=str(converted), method="vanilla", **base)
    elif row == "wasi":
        config = FinetuneConfig(model=MODEL, method="wasi", **base)
    elif row.startswith("jactus-"):
        config = FinetuneConfig(model=MODEL, method="jactus", retain=f"{row[7:]}%", **base)
    else:
        raise ValueError(f"unknown row {row!r}")
    started = time.perf_counter()
    result = finetune(config, loaded=loaded)
    doc = result.doc
    if row in ("lora", "dora"):
        deployed = stored_params(load_model(MODEL).model)  # adapters merged into the weights
    else:
        deployed = stored_params(to_inference_(result.model))
    if doc.get("jactus"):
        j = doc["jactus"]
        extra.update(greedy_gain=j["greedy"]["total_gain"], dp_gain=j["dp"]["total_gain"],
                     greedy_params=j["greedy"]["total_params"], dp_params=j["dp"]["total_params"])
    return {"accuracy": doc["final"]["accuracy"], "deployed_params": deployed, "lr": config.effective_lr,
            "original_params": stored_params(load_model(MODEL).model),
            "peak_bytes": (doc["memory"] or {}).get("peak_bytes"), "step_s": doc["step_time_median_s"],
            "minutes": (time.perf_counter() - started) / 60, **extra}


def add_adapters(model, *, dora: bool) -> int:
    """peft LoRA (or DoRA) adapters of rank 8 on the block linears; only they and the head train."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                       use_dora=dora), model)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
        trainable += p.numel() if p.requires_grad else 0
    return trainable


def convert_at(retain: float, calib: str, target: Path) -> None:
    """convert MODEL to `retain` of its stored bytes (data objective on the task's own images)."""
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    budget = int(retain * stored_params(load_model(MODEL).model)) * 4
    convert(load_model(MODEL), ConvertConfig(budget=budget, objective="data", calib=calib, output=str(target)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,mnist-rot")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--runs", default=str(RUNS), help="JSON-lines file of finished runs (read, appended)")
    parser.add_argument("--table-only", action="store_true", help="print the table from --runs, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks, rows, seeds = args.tasks.split(","), args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    done = read_runs(runs)
    if not args.table_only:
        with tempfile.TemporaryDirectory(prefix="bench_jactus_") as tmp:
            work = Path(tmp)
            for task in tasks:
                data = "digits" if task == "digits" else str(build_mnist_rot(work / "mnist-rot"))
                for row in rows:
                    for seed in seeds:
                        done.update(read_runs(runs))  # another invocation may have run it meanwhile
                        if (task, row, seed) in done:
                            continue
                        record = {"task": task, "row": row, "seed": seed, **run_row(row, seed, data, data, work)}
                        with runs.open("a") as f:
                            f.write(json.dumps(record, sort_keys=True) + "\n")
                        done[(task, row, seed)] = record
                        print(f"{task} {row} seed {seed}: {record['accuracy']:.2%} ({record['minutes']:.1f} min)",
                              file=sys.stderr, flush=True)
    print_table(done, tasks, rows, seeds)
    if any(r.startswith("jactus-80") for r in rows):
        print("\n" + checkpoint_check(0.8))
    return 0


def checkpoint_check(retain: float = 0.8) -> str:
    """The deployable form at `retain`, on digits: checkpoint bytes beside the original's, reload as MODEL,
    ONNX parity with onnxruntime (the structure does not depend on training, so no run is repeated)."""
    from wasi_compress.checkpoint import stored_bytes
    from wasi_compress.finetune.data import TrainingData
    from wasi_compress.loading import load_model
    from wasi_compress.onnx_export import export_onnx
    from wasi_compress.outputs import Outputs
    from wasi_compress.transforms import JactusConfig, jactus_, load, save

    loaded = load_model(MODEL)
    data = TrainingData("digits", loaded.input_size, loaded.mean, loaded.std, "cpu")
    original = stored_bytes(loaded.model, torch.float32)
    batches = [(data.batch(data.train.images[i:i + 64]), data.train.labels[i:i + 64]) for i in range(0, 256, 64)]
    jactus_(loaded.model, JactusConfig(retain=retain), calib=batches)
    with tempfile.TemporaryDirectory(prefix="bench_jactus_ckpt_") as tmp:
        path = save(loaded.model, Path(tmp) / "j.safetensors", arch=MODEL)
        reloaded = load(path)
        x = batches[0][0][:8]
        same = torch.allclose(reloaded(x), loaded.model.eval()(x), atol=1e-5)
        with Outputs() as outputs:
            diff = export_onnx(reloaded, x, Path(tmp) / "j.onnx", outputs, tolerance=1e-4, opset=17, notes=[])
            outputs.commit()
        size = Path(path).stat().st_size
    stored = stored_bytes(reloaded, torch.float32)
    return (f"checkpoint at {retain:.0%}: {stored:,} parameter bytes of the original's {original:,} "
            f"({stored / original:.3f}; file {size:,} bytes with its metadata); reloads as MODEL with the same outputs: "
            f"{'yes' if same else 'NO'}; ONNX max abs difference from torch {diff.max_abs_diff:.2e} "
            f"({diff.rel_diff:.2e} of the output's scale)")


def read_runs(path: Path) -> dict:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["row"], r["seed"]): r for r in records}


def print_table(done: dict, tasks, rows, seeds) -> None:
    print(f"# bench_jactus: {MODEL}, 5 epochs, batch 64, seeds {seeds}; SGD momentum 0.9, cosine, peak lr 0.01 "
          f"(0.03 for jactus), ROW-lrX at peak lr X; torch {torch.__version__}, 1 thread, "
          f"{platform.processor() or platform.machine()}")
    print("# step times were measured on a machine shared with other jobs (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when this table was printed): compare them only roughly; "
          "the step peak is measured on seed 0's run")
    for task in tasks:
        print(f"\n## {task}")
        print(f"{'row':17} " + " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
              + f" {'mean':>7} {'deployed params':>16} {'x original':>10} {'step peak':>10} {'median step':>11}")
        means = {}
        for row in rows:
            recs = [done.get((task, row, s)) for s in seeds]
            ran = [r for r in recs if r]
            if not ran:
                print(f"{row:17} (not run)")
                continue
            accs = [r["accuracy"] * 100 for r in ran]
            mean = statistics.mean(accs)
            if len(ran) == len(seeds):
                means[row] = mean
            r0 = ran[0]
            peak = next((r["peak_bytes"] for r in ran if r.get("peak_bytes")), None)
            print(f"{row:17} " + " ".join(f"{r['accuracy'] * 100:7.2f}" if r else f"{'-':>7}" for r in recs)
                  + f" {mean:7.2f} {r0['deployed_params']:16,d} {r0['deployed_params'] / r0['original_params']:10.3f} "
                  + (f"{peak / 1e6:7.1f} MB " if peak else f"{'n/a':>10} ")
                  + f"{statistics.median(r['step_s'] for r in ran) * 1000:8.0f} ms"
                  + ("" if len(ran) == len(seeds) else f"  (mean of {len(ran)} seed{'s' * (len(ran) > 1)} only)"))
        for row in rows:
            r0 = done.get((task, row, seeds[0]))
            if r0 and "greedy_gain" in r0:
                print(f"{row}: greedy allocation gain {r0['greedy_gain']:.4f} in {r0['greedy_params']:,} parameters; "
                      f"exact DP on the same candidates {r0['dp_gain']:.4f} in {r0['dp_params']:,}")
        partial = {row: statistics.mean(r["accuracy"] * 100 for s in seeds if (r := done.get((task, row, s))))
                   for row in rows if any(done.get((task, row, s)) for s in seeds)}
        peers = [row for row in ("lora-lr0.03", "ctf-80-lr0.03") if row in partial]
        if "jactus-80" in means and peers:
            print("the peers at jactus's peak lr 0.03 (mean of the seeds run): "
                  + ", ".join(f"{row} {partial[row]:.2f}" for row in peers) + f"; jactus-80 {means['jactus-80']:.2f}")
        if {"jactus-80", "lora", "ctf-80"} <= set(means):
            verdict = means["jactus-80"] >= max(means["lora"], means["ctf-80"])
            print(f"done-when (jactus-80 mean >= lora and >= ctf-80): {'holds' if verdict else 'MISSED'} "
                  f"({means['jactus-80']:.2f} vs {means['lora']:.2f}, {means['ctf-80']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
