"""The images `convert` calibrates and evaluates on, fitted to the model's input."""

from __future__ import annotations

import torch

from wasi_compress.loading import LoadedModel
from wasi_compress.convert.config import IMAGE_CALIB_BATCHES


def calibration_batches(config, loaded: LoadedModel, notes: list[str]) -> list[torch.Tensor]:
    """``calib_batches`` batches of ``calib_batch_size`` training images (or uniform noise), normalised;
    token ids for a text model (convert/tokens.py)."""
    from wasi_compress.data import adapt_images, load_images, normalize, random_images
    from wasi_compress.inputs import is_text_model

    if is_text_model(loaded.model):
        from wasi_compress.convert.tokens import calibration_token_batches

        return calibration_token_batches(config, loaded.model, notes)

    c, h, w = loaded.input_size
    n = (config.calib_batches or IMAGE_CALIB_BATCHES) * config.calib_batch_size
    if config.calib == "random":
        images = random_images(n, c, (h, w), seed=config.seed)
        notes.append(f"calibrated on {n} uniform-noise images (no data given)")
    else:
        ds = load_images(config.calib, "train", size=(h, w))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(config.seed))[:n]
        if len(idx) < n:
            notes.append(f"calibration set {config.calib} has {len(idx)} training images, fewer than {n} asked for")
        images, adapt_notes = adapt_images(ds.images[idx], c, (h, w))
        notes.extend(f"calibration: {t}" for t in adapt_notes)
    images = normalize(images, loaded.mean, loaded.std)
    bs = config.calib_batch_size
    return [images[i:i + bs] for i in range(0, len(images), bs)]


def evaluation_set(name: str, loaded: LoadedModel, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of `name`, fitted to the model's input and normalised, with its labels."""
    from wasi_compress.data import adapt_images, load_images, normalize
    from wasi_compress.errors import UserError
    from wasi_compress.inputs import is_text_model

    if is_text_model(loaded.model):
        raise UserError(f"--eval measures top-1 on images; {loaded.spec} is a text model")
    c, h, w = loaded.input_size
    ds = load_images(name, "test", size=(h, w))
    images, adapt_notes = adapt_images(ds.images, c, (h, w))
    notes.extend(f"evaluation: {t}" for t in adapt_notes)
    if loaded.num_classes is not None and loaded.num_classes < ds.num_classes:
        notes.append(f"evaluation: the model has {loaded.num_classes} classes, {name} has {ds.num_classes}")
    return normalize(images, loaded.mean, loaded.std), ds.labels
