"""The train and held-out splits of a fine-tuning run, fitted to the model's input per batch: images
here, token ids for a text model (text_data.py)."""

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


def training_data(config, loaded):
    """The run's splits: text (text_data.TextData) for a text model, images otherwise; a text task for an
    image model, or images for a text model, is one line."""
    from wasi_compress.errors import UserError
    from wasi_compress.finetune.text_data import TextData, is_text_data
    from wasi_compress.inputs import is_text_model

    text_model, text_data = is_text_model(loaded.model), is_text_data(config.data)
    if text_model and not text_data:
        raise UserError(f"{config.model} is a text model and --data {config.data} is images; give a text task: "
                        "text:FILE (one label<TAB>sentence a line) or stdlib-docs")
    if text_data and not text_model:
        raise UserError(f"--data {config.data} is a text task, but {config.model} is an image model; give images "
                        "(mnist, digits, a folder) or a text model (hf:<dir>, builtin:minilm)")
    if text_model:
        return TextData(config.data, loaded.model, config.device)
    return TrainingData(config.data, loaded.input_size, loaded.mean, loaded.std, config.device)


def permutation(n: int, seed: int, epoch: int) -> Tensor:
    """Epoch order from its own generator: the same for a resumed run, independent of the model's RNG use."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def evaluate(model, data: TrainingData) -> float:
    """Top-1 on the held-out split (wasi_compress.evaluation)."""
    from wasi_compress.evaluation import top1_accuracy

    return top1_accuracy(model, data.test_batches())
