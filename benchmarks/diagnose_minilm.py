"""Where the converted MiniLM's error comes from (issue 10): the plan `lowrank_` makes at a fraction of the
float32 bytes with the data objective (the benchmark's calibration and held-out sentences), then its parts
alone on the original model: the token embedding as planned with every linear dense, and the linears at
their planned ranks with the embeddings dense. Mean and minimum cosine of the held-out sentence
embeddings and same nearest neighbours, as in bench_minilm.py.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_minilm.py --fraction 0.5
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import wasi_compress  # noqa: E402,F401

from bench_minilm import compare, sentence_embeddings, sentences  # noqa: E402


def main(argv=None) -> None:
    from wasi_compress.convert.tokens import tokenize_lines
    from wasi_compress.loading import load_model
    from wasi_compress.transforms import LowRankConfig, lowrank_
    from wasi_compress.transforms._lowrank_embeddings import is_embedding_site

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences of the help topics (471: all)")
    parser.add_argument("--docstrings", type=int, default=1000, help="calibration sentences of stdlib docstrings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model("builtin:minilm", seq_len=args.seq_len).model.eval()
    pad = model.token_input.pad_token_id
    calib_text, held_text = sentences(args.calib, 128, args.docstrings)
    calib, held = tokenize_lines(model, calib_text, args.seq_len), tokenize_lines(model, held_text, args.seq_len)
    original = sentence_embeddings(model, held, pad)
    total = sum(p.numel() * 4 for p in model.parameters())
    start = time.perf_counter()
    planned = lowrank_(copy.deepcopy(model), LowRankConfig(budget=int(total * args.fraction), objective="data"),
                       example=held[:2], calib=[calib[i:i + 32] for i in range(0, len(calib), 32)])
    took = time.perf_counter() - start
    chosen = {name: c for name, c in planned.chosen if c.rank is not None}
    embeddings = {layer.site.name for layer in planned.layers if is_embedding_site(layer.site)}
    print(f"{args.fraction:.0%} of {total} bytes, data objective, planned in {took:.0f} s:",
          ", ".join(f"{name} {chosen[name].label}" for name in sorted(embeddings & set(chosen))),
          f"; {len(set(chosen) - embeddings)} of {len(planned.layers) - len(embeddings)} linears factored")
    rows = [("the plan", planned.model)]
    for what, keep in (("embeddings alone", embeddings), ("linears alone", set(chosen) - embeddings)):
        part = copy.deepcopy(model)
        for name in keep & set(chosen):
            part.set_submodule(name, copy.deepcopy(planned.model.get_submodule(name)))
        rows.append((what, part))
    for what, m in rows:
        r = compare(original, sentence_embeddings(m, held, pad))
        print(f"{what:<18} cos mean {r['cos_mean']:.4f}  min {r['cos_min']:.4f}  same NN {r['same_nn'] * len(held):.0f}/{len(held)}")


if __name__ == "__main__":
    main()
