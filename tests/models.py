"""The one list of test models: every tiny model the tests build, with what a generic test may expect of it.

The models themselves are defined once, in tests/vit_models.py; each entry names the MODEL string the CLI
and `wasi_compress.loading.load_model` accept (``vit_models:<factory>`` or ``convert_models:<factory>``,
the tests folder on sys.path) and the flags that say which generic checks apply (tests/test_generic.py
parametrizes over TEST_MODELS, the timm/optimum way). Add a model here, and every generic test runs on it.

This file is loaded by path (``import_models()`` in the tests), not as a package: pytest runs with
--import-mode=importlib, which does not put the tests folder on sys.path."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TESTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TestModel:
    name: str
    model: str                      # MODEL string: "vit_models:<factory>" / "convert_models:<factory>" / "timm:<name>"
    input_size: tuple[int, int, int]
    linears: int                    # linear sites capture finds (module + functional)
    capture_method: str = "fx"      # "fx", or "hooks" where torch.fx cannot trace the model
    has_functional_linear: bool = False  # an F.linear on raw parameters (needs the fx graph to replace)
    has_mha: bool = False           # nn.MultiheadAttention, made explicit by capture
    trainable_timm: bool = False    # a timm model the fine-tuning job trains as is (8x8 digits)
    onnx: bool = True               # exportable to ONNX with parity checked
    slow: bool = False              # more than about a second per generic test
    train_step: bool = True         # the training-step test runs on it (off for base widths: 10 s a method)
    timm_kwargs: dict | None = field(default=None, hash=False, compare=False)  # timm:<name> at a small size

    __test__ = False  # not a test class, despite the name

    @property
    def traceable(self) -> bool:
        return self.capture_method == "fx"

    @property
    def loadable(self) -> bool:
        """`load_model(self.model)` builds exactly this model (a timm entry at a small size does not: its
        MODEL string names the full-size architecture), so convert can write it and `load` restore it."""
        return self.timm_kwargs is None

    def factory(self, **kwargs) -> nn.Module:
        """A fresh model (same seeded weights every call), in eval mode."""
        module_name, _, attr = self.model.partition(":")
        if module_name == "timm":
            import wasi_compress  # noqa: F401  (before timm)
            import timm

            with torch.random.fork_rng():
                torch.manual_seed(0)
                return timm.create_model(attr, pretrained=False, **{**self.timm_kwargs, **kwargs}).eval()
        return getattr(import_factories(module_name), attr)(**kwargs).eval()

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, *self.input_size, generator=torch.Generator().manual_seed(seed))


def import_factories(module_name: str):
    """tests/vit_models.py or tests/convert_models.py, imported under its own name (as the CLI does)."""
    if module_name not in sys.modules:
        sys.path.insert(0, str(TESTS_DIR))
        try:
            importlib.import_module(module_name)
        finally:
            sys.path.remove(str(TESTS_DIR))
    return sys.modules[module_name]


# qkv, proj, fc1, fc2 per block (q, k, v, out_proj, fc1, fc2 where nn.MultiheadAttention is made
# explicit), depth 2, plus the head; Swin: one block per stage, a patch merging and the head.
TEST_MODELS: list[TestModel] = [
    TestModel("functional_head_vit", "vit_models:functional_head_vit", (3, 32, 32), 9, has_functional_linear=True),
    TestModel("mha_vit", "vit_models:mha_vit", (3, 32, 32), 13, has_mha=True),
    TestModel("untraceable_vit", "vit_models:untraceable_vit", (3, 32, 32), 9, capture_method="hooks"),
    TestModel("hand_vit", "convert_models:hand_vit", (3, 16, 16), 13, has_functional_linear=True, has_mha=True),
    TestModel("tiny_timm_vit", "vit_models:tiny_timm_vit", (1, 8, 8), 9, trainable_timm=True),
    TestModel("tiny_vit", "convert_models:tiny_vit", (3, 32, 32), 9, slow=True),
    TestModel("tiny_swin", "convert_models:tiny_swin", (3, 32, 32), 10),
    TestModel("structured_mlp", "convert_models:structured_mlp", (1, 8, 8), 3),
]


def _timm(name: str, input_size, linears: int, **kwargs) -> TestModel:
    return TestModel(f"timm-{name}", f"timm:{name}", input_size, linears, slow=True,
                     has_functional_linear=kwargs.pop("functional", False), train_step="_base_" not in name,
                     timm_kwargs=kwargs)


# timm families at small sizes (depth 2 where timm allows it; Swin needs an image of window x patch x 2
# for two stages): capture and the passes must handle each; slow, so `make test-fast` leaves them out.
TIMM_MODELS: list[TestModel] = [
    _timm("vit_tiny_patch16_224", (3, 32, 32), 9, img_size=32, depth=2),
    _timm("vit_small_patch16_224", (3, 32, 32), 9, img_size=32, depth=2),
    _timm("vit_base_patch16_224", (3, 32, 32), 9, img_size=32, depth=2),
    _timm("vit_base_patch32_224", (3, 64, 64), 9, img_size=64, depth=2),
    _timm("deit_tiny_patch16_224", (3, 32, 32), 9, img_size=32, depth=2),
    _timm("deit_tiny_distilled_patch16_224", (3, 32, 32), 10, img_size=32, depth=2),  # head and head_dist
    _timm("deit3_small_patch16_224", (3, 32, 32), 9, img_size=32, depth=2),
    _timm("swin_tiny_patch4_window7_224", (3, 56, 56), 18, img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
    # BEiT: qkv is F.linear with a computed q/v bias; EVA: rope, SwiGLU, F.linear qkv
    _timm("beit_base_patch16_224", (3, 32, 32), 9, img_size=32, depth=2, functional=True),
    _timm("eva02_tiny_patch14_224", (3, 28, 28), 9, img_size=28, depth=2, num_classes=10, functional=True),
]
TEST_MODELS = TEST_MODELS + TIMM_MODELS
BY_NAME = {m.name: m for m in TEST_MODELS}
assert len(BY_NAME) == len(TEST_MODELS), "test model names must be unique"
