"""The train and held-out splits of a fine-tuning run, fitted to the model's input per batch."""

from __future__ import annotations

import torch
from torch import Tensor

EVAL_BATCH = 256


class TrainingData:
    """The train and held-out splits, fitted to the model's input per batch (resize, channels, normalise)."""

    def __init__(self, name: str, input_size: tuple[int, int, int], mean, std, device: str):
        from wasi_compress.data import adapt_images, load_images

        self.train = load_images(name, "train", size=input_size)
        self.test = load_images(name, "test", size=input_size)
        self.input_size, self.mean, self.std, self.device = input_size, mean, std, device
        _, adapt_notes = adapt_images(self.train.images[:1], input_size[0], tuple(input_size[1:]))
        self.notes = list(dict.fromkeys(self.train.notes + self.test.notes + adapt_notes))
        self.num_classes = max(self.train.num_classes, self.test.num_classes)

    def batch(self, images: Tensor) -> Tensor:
        from wasi_compress.data import adapt_images, normalize

        images, _ = adapt_images(images, self.input_size[0], tuple(self.input_size[1:]))
        return normalize(images, self.mean, self.std).to(self.device)

    def test_batches(self):
        from wasi_compress.evaluation import batched

        return batched(self.test.images, self.test.labels, EVAL_BATCH, self.batch)


def permutation(n: int, seed: int, epoch: int) -> Tensor:
    """Epoch order from its own generator: the same for a resumed run, independent of the model's RNG use."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def evaluate(model, data: TrainingData) -> float:
    """Top-1 on the held-out split (wasi_compress.evaluation)."""
    from wasi_compress.evaluation import top1_accuracy

    return top1_accuracy(model, data.test_batches())
