"""Print a WASI fine-tune beside a vanilla one, from their finetune/1 JSON reports.

    python examples/compare_finetune.py out/finetune-vanilla.json out/finetune-wasi.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from wasi_compress.gates import FINETUNE, load_report
from wasi_compress.units import format_bytes

KEYS = ("linear_layers_bytes", "saved_activation_bytes", "peak_bytes", "paper_scope_bytes")


def main(vanilla_path: str, wasi_path: str) -> None:
    vanilla, wasi = load_report(Path(vanilla_path)), load_report(Path(wasi_path))
    for path, doc in ((vanilla_path, vanilla), (wasi_path, wasi)):
        if doc["schema"] != FINETUNE:
            sys.exit(f"error: {path} is a {doc['schema']} report, not a finetune report")
    print(f"{'':24}{'vanilla':>14}{wasi['method']:>14}{'ratio':>10}")
    print(f"{'held-out accuracy':24}{vanilla['final']['accuracy']:>14.2%}{wasi['final']['accuracy']:>14.2%}")
    for key in KEYS:
        v, w = vanilla["memory"][key], wasi["memory"][key]
        print(f"{key:24}{format_bytes(v):>14}{format_bytes(w):>14}{v / w:>9.1f}x")
    print(f"{'median step time':24}{vanilla['step_time_median_s']:>13.3f}s{wasi['step_time_median_s']:>13.3f}s"
          f"{vanilla['step_time_median_s'] / wasi['step_time_median_s']:>9.2f}x")
    print("memory figures are measured over a training step (see each report's sources); ratio = vanilla / compressed")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    main(sys.argv[1], sys.argv[2])
