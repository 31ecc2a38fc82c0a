"""Image folders are read as they are: pixel values scaled by each image's mode and bit depth, and every
image resized to one common size as it is read (issue 11, section 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wasi_compress.data import load_images

Image = pytest.importorskip("PIL.Image")


def _rgb(path: Path, h: int = 8, w: int = 8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _two_classes(root: Path, save_a, n: int = 2) -> Path:
    """Class `a` holds images written by `save_a(path)`, class `b` ordinary 8x8 RGB images."""
    (root / "a").mkdir(parents=True)
    for i in range(n):
        save_a(root / "a" / f"{i}")
        _rgb(root / "b" / f"{i}.png", seed=i)
    return root


def test_a_16_bit_png_keeps_its_values(tmp_path):
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    for cls, pixels in (("a", values), ("b", values[::-1].copy())):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "d" / cls / "0.png")  # a 16-bit grayscale PNG
    assert Image.open(tmp_path / "d" / "a" / "0.png").mode in ("I;16", "I;16B", "I")
    ds = load_images(str(tmp_path / "d"), "all")
    assert ds.images.shape == (2, 1, 2, 2)
    torch.testing.assert_close(ds.images[0, 0], torch.from_numpy(values.astype(np.float32) / 65535))
    assert ds.images[0, 0, 1, 0] == 1.0 and abs(float(ds.images[0, 0, 0, 1]) - 0.5) < 1e-4
    assert 0.2 < float(ds.images[0].mean()) < 0.6  # not all 1.0, as when 16-bit values were divided by 255


def test_a_float_tiff_keeps_its_values_and_clips_outside_0_1(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 0.75]], dtype=np.float32)
    out_of_range = np.array([[-1.0, 0.5], [2.0, np.nan]], dtype=np.float32)

    def save(path):
        Image.fromarray(values if path.name == "0" else out_of_range).save(path.with_suffix(".tif"))
    root = _two_classes(tmp_path / "d", save)
    assert Image.open(root / "a" / "0.tif").mode == "F"
    ds = load_images(str(root), "all", size=(2, 2))
    assert ds.images.shape == (4, 3, 2, 2)  # class b is RGB: grayscale images repeated to 3 channels
    torch.testing.assert_close(ds.images[0, 0], torch.from_numpy(values))
    torch.testing.assert_close(ds.images[1, 0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert any("clipped" in note for note in ds.notes)


def test_rgba_palette_and_la_images_load(tmp_path):
    def save(path):
        rgba = np.zeros((8, 8, 4), dtype=np.uint8)
        rgba[..., 0], rgba[..., 3] = 255, 128  # red, half transparent
        Image.fromarray(rgba, "RGBA").save(path.with_suffix(".png"))
        Image.fromarray(rgba[..., :3], "RGB").convert("P").save(path.with_name(path.name + "p.png"))
        Image.fromarray(rgba[..., [0, 3]], "LA").save(path.with_name(path.name + "la.png"))
        Image.fromarray(rgba[..., :3], "RGB").save(path.with_name(path.name + "gif.gif"))
    root = _two_classes(tmp_path / "d", save, n=1)
    ds = load_images(str(root), "all")
    assert ds.images.shape == (5, 3, 8, 8) and ds.labels.tolist() == [0, 0, 0, 0, 1]
    by_name = dict(zip(sorted(p.name for p in (root / "a").iterdir()), ds.images[:4]))
    for name in ("0.png", "0p.png", "0gif.gif"):  # alpha dropped: the colour is red as stored
        torch.testing.assert_close(by_name[name][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(by_name["0la.png"][:, 0, 0], torch.ones(3))  # L of 255, repeated to RGB
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0


def _asymmetric(h: int, w: int) -> np.ndarray:
    """A white top row on black: orientation shows which dimension is the height."""
    pixels = np.zeros((h, w), dtype=np.uint8)
    pixels[0, :] = 255  # top row white
    return pixels


def test_mixed_sizes_give_the_most_common_size_without_transposing(tmp_path):
    root = tmp_path / "d"
    for cls, n in (("a", 2), ("b", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_asymmetric(10, 20)).save(root / cls / f"{i}.png")  # 10 high, 20 wide
    Image.fromarray(_asymmetric(20, 10)).save(root / "a" / "tall.png")  # max() of (h, w) would pick 20x10
    ds = load_images(str(root), "all")
    assert ds.images.shape == (5, 1, 10, 20)
    first = ds.images[0, 0]
    assert torch.all(first[0] == 1.0) and torch.all(first[1:] == 0.0)  # the top row stays the top row
    tall = ds.images[2, 0]  # a/tall.png, resized to 10x20: still bright at the top, dark at the bottom
    assert float(tall[0].mean()) > 0.3 and float(tall[-1].mean()) < 0.05
    assert any("2 sizes" in note and "10x20" in note for note in ds.notes)
    # a target size resizes every image to it, orientation kept
    ds = load_images(str(root), "all", size=(3, 6, 12))
    assert ds.images.shape == (5, 1, 6, 12) and float(ds.images[0, 0, 0].mean()) > float(ds.images[0, 0, -1].mean())


def test_one_large_image_among_small_ones_is_not_held_at_its_size(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        for i in range(3):
            _rgb(root / cls / f"{i}.png", 16, 16, seed=i)
    Image.new("RGB", (2000, 2000), (255, 0, 0)).save(root / "a" / "big.png")
    largest = []
    real_empty = torch.empty

    def empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        largest.append(t.numel())
        return t
    monkeypatch.setattr(torch, "empty", empty)
    ds = load_images(str(root), "all")
    assert ds.images.shape == (7, 3, 16, 16)  # the most common size, not 2000x2000
    assert max(largest) <= 7 * 3 * 16 * 16
    torch.testing.assert_close(ds.images[3, :, 8, 8], torch.tensor([1.0, 0.0, 0.0]))  # a/big.png (sorted last in a), red
    ds = load_images(str(root), "train", size=(3, 8, 8))
    assert ds.images.shape[1:] == (3, 8, 8)


def test_mode_i_is_read_as_16_bit_and_clipped(tmp_path):
    values = np.array([[0, 32768], [65535, 70000]], dtype=np.int32)
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.fromarray(values, "I").save(tmp_path / "d" / cls / "0.tif")
    assert Image.open(tmp_path / "d" / "a" / "0.tif").mode == "I"
    ds = load_images(str(tmp_path / "d"), "all")
    torch.testing.assert_close(ds.images[0, 0], torch.tensor([[0.0, 32768 / 65535], [1.0, 1.0]]))
    assert any("clipped" in note for note in ds.notes)


@pytest.mark.slow  # a fine-tuning run
def test_finetune_trains_on_the_values_16_bit_float_and_mixed_size_images_hold(tmp_path, cli):
    """What `finetune --data DIR` trains on: the tiny ViT's 1x8x8 inputs from constant images of three
    kinds and three sizes, each at the value it holds (the misreadings of old made 16-bit images 1.0
    and float ones 0.0, and these classes one)."""
    from wasi_compress.finetune.data import TrainingData

    root = tmp_path / "d"
    (root / "bit16").mkdir(parents=True)
    (root / "float").mkdir()
    (root / "bit8").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 12), 16384, dtype=np.uint16)).save(root / "bit16" / f"{i}.png")  # 0.25
        Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(root / "float" / f"{i}.tif")
        Image.fromarray(np.full((20, 10), 255, dtype=np.uint8)).save(root / "bit8" / f"{i}.png")  # 1.0
    data = TrainingData(str(root), (1, 8, 8), (0.0,), (1.0,), "cpu")
    images = torch.cat([data.train.images, data.test.images])
    labels = torch.cat([data.train.labels, data.test.labels])
    assert images.shape[1:] == (1, 8, 8)
    for label, value in enumerate((0.25, 1.0, 0.5)):  # classes sorted: bit16, bit8, float -> 0, 1, 2
        torch.testing.assert_close(images[labels == label], torch.full_like(images[labels == label], value))
    result = cli("finetune", "vit_models:tiny_timm_vit", "--data", root, "--epochs", "1", "--method", "vanilla",
                 "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.safetensors").is_file()
