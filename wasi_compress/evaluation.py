"""One accuracy evaluator for every job: top-1 over (inputs, labels) batches, in eval mode and no_grad,
the model's training mode restored afterwards."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of correct argmax predictions; labels stay on the CPU, outputs are moved there."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    try:
        for x, y in batches:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            correct += int((out.argmax(-1).cpu() == y.cpu()).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    return correct / max(seen, 1)


def batched(images: torch.Tensor, labels: torch.Tensor, batch_size: int, prepare=lambda x: x):
    """(prepare(images[i:i+b]), labels[i:i+b]) for consecutive batches."""
    for i in range(0, len(labels), batch_size):
        yield prepare(images[i:i + batch_size]), labels[i:i + batch_size]
