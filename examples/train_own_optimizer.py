"""The same own-loop fine-tune with the optimizer and schedule of your choice: AdamW with a cosine
learning-rate schedule from torch. `handle.attach` hooks the optimizer, so the per-step bookkeeping
(re-orthonormalising the factors after each step) needs no code in the loop.

    python examples/train_own_optimizer.py --epochs 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import wasi_compress
from wasi_compress import WasiConfig, prepare_training_, save, to_inference_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_own_loop import accuracy, digits  # noqa: E402  (the same data as the first example)


def main(epochs: int = 2, out: str = "out/own-optimizer.safetensors", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    train, test = digits(seed=seed)
    model = wasi_compress.load("builtin:mnist-vit")
    handle = prepare_training_(model, WasiConfig(method="wasi", update="optimizer-step", threshold=0.7),
                               example=train.tensors[0][:2])
    model = handle.model
    loader = DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    handle.attach(optimizer)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    to_inference_(model)
    save(model, out)
    return {"accuracy": accuracy(model, test), "output": out, "layers": handle.layers}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="out/own-optimizer.safetensors")
    args = parser.parse_args()
    result = main(args.epochs, args.out)
    print(f"held-out accuracy {result['accuracy']:.2%}; wrote {result['output']}")
