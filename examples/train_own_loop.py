"""Fine-tune a timm ViT with WASI in a plain PyTorch loop: one call in, your own loop, one call out.

The model is `builtin:mnist-vit` (a timm VisionTransformer trained on MNIST, shipped in the package);
the task is scikit-learn's 8x8 digits, upsampled to the model's 28x28 input, through a DataLoader.

    python examples/train_own_loop.py --epochs 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import wasi_compress
from wasi_compress import WasiConfig, prepare_training_, save, to_inference_


def digits(size: int = 28, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (N, 1, size, size) tensors normalised like MNIST, split 80/20."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - 0.5) / 0.5
    y = torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(-1) == y).float().mean())


def main(epochs: int = 2, out: str = "out/own-loop.safetensors", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    train, test = digits(seed=seed)
    model = wasi_compress.load("builtin:mnist-vit")
    handle = prepare_training_(model, WasiConfig(method="wasi", threshold=0.7), example=train.tensors[0][:2])
    model = handle.model
    optimizer = handle.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9))
    for _ in range(epochs):
        model.train()
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    to_inference_(model)
    save(model, out)
    return {"accuracy": accuracy(model, test), "output": out, "layers": handle.layers}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="out/own-loop.safetensors")
    args = parser.parse_args()
    result = main(args.epochs, args.out)
    print(f"held-out accuracy {result['accuracy']:.2%}; wrote {result['output']}")
