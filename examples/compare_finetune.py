"""Print fine-tunes side by side, vanilla first, from their finetune/1 JSON reports.

    python examples/compare_finetune.py out/finetune-vanilla.json out/finetune-wasi.json [more.json ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from wasi_compress.gates import FINETUNE, load_report
from wasi_compress.units import format_bytes

KEYS = ("linear_layers_bytes", "saved_activation_bytes", "peak_bytes", "paper_scope_bytes")


def _label(doc: dict) -> str:
    plan = doc.get("memory_plan")
    return f"{doc['method']} @ {format_bytes(plan['budget_bytes'])}" if plan else doc["method"]


def main(paths: list[str]) -> None:
    docs = [load_report(Path(p)) for p in paths]
    for path, doc in zip(paths, docs):
        if doc["schema"] != FINETUNE:
            sys.exit(f"error: {path} is a {doc['schema']} report, not a finetune report")
    base = docs[0]
    print(f"{'':24}" + "".join(f"{_label(d):>20}" for d in docs))
    print(f"{'held-out accuracy':24}" + "".join(f"{d['final']['accuracy']:>20.2%}" for d in docs))
    for key in KEYS:
        cells = [format_bytes(d["memory"][key]) + (f" ({base['memory'][key] / d['memory'][key]:.1f}x)" if i else "")
                 for i, d in enumerate(docs)]
        print(f"{key:24}" + "".join(f"{c:>20}" for c in cells))
    print(f"{'median step time':24}" + "".join(f"{d['step_time_median_s']:>19.3f}s" for d in docs))
    print("memory figures are measured over a training step (see each report's sources); (Nx) = first / this")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip())
    main(sys.argv[1:])
