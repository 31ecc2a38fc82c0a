"""The timm ViT-family sweep (issue 10, section 3): one entry per family, the smallest registered variant,
at a small image size where the model takes one; and the steps every entry goes through, as a user
would: analyze at batch 1, convert at half the model's bytes with ONNX parity, reload the checkpoint,
and one WASI training step that must replace layers.

Used by tests/test_timm_sweep.py (one slow test per model) and benchmarks/sweep_timm.py (the committed
table). Loaded by path, like tests/models.py."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress  # noqa: F401  (before timm and torchvision)


@dataclass(frozen=True)
class SweepModel:
    name: str                    # timm name, or tv:<torchvision name>
    img_size: int                # the input's height and width
    img_kwarg: bool = True       # the constructor takes img_size (else the model runs at any size)
    xfail: str | None = None     # why the model cannot be handled yet (the test is an xfail with this reason)
    depth: int | None = None     # base-width models at this depth (a factory in this module), to keep CI short
    kwargs: tuple = ()           # other constructor arguments of that factory ((name, value) pairs): fewer blocks
    opset: int = 17              # the ONNX opset to export at (VOLO's fold needs Col2Im, opset 18)

    @property
    def spec(self) -> str:
        if self.name.startswith("tv:"):
            return f"tv_models:{self.name[3:]}" + ("_shallow" if self.depth else "")
        return f"timm_sweep:shallow_{self.name}" if self.shallow else f"timm:{self.name}"

    @property
    def shallow(self) -> bool:
        return self.depth is not None or bool(self.kwargs)

    @property
    def factory(self) -> bool:
        """Built by a factory (not timm:<name>): the checkpoint names it, and loading it needs trust_code."""
        return self.name.startswith("tv:") or self.shallow


# The 24 families of the issue and the hybrids it names, smallest variant each, plus torchvision's two.
SWEEP: list[SweepModel] = [
    SweepModel("vit_tiny_patch16_224", 64),
    SweepModel("deit_tiny_patch16_224", 64),
    SweepModel("swin_tiny_patch4_window7_224", 64),
    SweepModel("beit_base_patch16_224", 64, depth=2),  # BEiT has no smaller registered variant
    SweepModel("cait_xxs24_224", 64),
    SweepModel("xcit_nano_12_p16_224", 64),
    SweepModel("pvt_v2_b0", 64, img_kwarg=False),
    SweepModel("twins_pcpvt_small", 64),
    SweepModel("crossvit_tiny_240", 240),
    SweepModel("convit_tiny", 64),
    SweepModel("tnt_s_patch16_224", 64),
    SweepModel("pit_ti_224", 64),
    SweepModel("levit_128s", 64),
    SweepModel("eva02_tiny_patch14_224", 56),
    SweepModel("visformer_tiny", 64),
    SweepModel("efficientformer_l1", 224),
    SweepModel("fastvit_t8", 64, img_kwarg=False),
    SweepModel("mobilevit_xxs", 64),
    SweepModel("coat_tiny", 64),
    SweepModel("poolformer_s12", 64, img_kwarg=False),
    SweepModel("nest_tiny", 64),
    SweepModel("gcvit_xxtiny", 64),
    SweepModel("efficientvit_m0", 64),
    SweepModel("efficientformerv2_s0", 64),
    SweepModel("tiny_vit_5m_224", 64, img_kwarg=False),
    SweepModel("volo_d1_224", 64, opset=18),  # outlook attention folds patches (F.fold): Col2Im, opset 18
    SweepModel("tv:vit_b_16", 64, depth=2),  # vit_b_16's widths, 2 layers (full depth: 3 minutes here)
    SweepModel("tv:swin_t", 64, img_kwarg=False),
]
# More families and variants: in the committed table (benchmarks/sweep_timm.txt); the test runs them with
# WASI_SWEEP_ALL=1 only, to keep CI's sweep to a few minutes.
EXTRA: list[SweepModel] = [
    SweepModel("deit3_small_patch16_224", 64),
    SweepModel("flexivit_small", 64),
    SweepModel("swinv2_cr_tiny_ns_224", 64),
    SweepModel("twins_svt_small", 64),
    SweepModel("coat_lite_tiny", 64),
    SweepModel("caformer_s18", 64, img_kwarg=False),
    SweepModel("mvitv2_tiny", 64),
    SweepModel("hiera_tiny_224", 64),
    SweepModel("maxvit_nano_rw_256", 64),
]
BY_NAME = {m.name: m for m in SWEEP + EXTRA}


def __getattr__(attr: str):
    """``shallow_<timm name>``: that timm model at the sweep entry's depth (MODEL timm_sweep:shallow_<name>)."""
    entry = BY_NAME.get(attr[len("shallow_"):]) if attr.startswith("shallow_") else None
    if entry is None or not entry.shallow:
        raise AttributeError(attr)

    def build(num_classes: int | None = None, img_size: int | None = None):
        import timm

        kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
        depth = {"depth": entry.depth} if entry.depth else {}
        return timm.create_model(entry.name, pretrained=False, **depth, **dict(entry.kwargs), **kwargs)

    return build


def load(entry: SweepModel):
    """The model as `load_model` gives it (with --img-size where the constructor takes one), at the
    entry's input size, seeded."""
    from wasi_compress.inputs import data_config
    from wasi_compress.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(entry.spec, img_size=entry.img_size if entry.img_kwarg else None)
    if not entry.img_kwarg:  # runs at any size: only the input changes
        loaded.input_size = (loaded.input_size[0], entry.img_size, entry.img_size)
        loaded.model.default_input_size = loaded.input_size
    return loaded


def run(entry: SweepModel, workdir: Path) -> dict[str, Any]:
    """Every step on one model; returns what each measured. Raises at the first step that fails
    (the exception says which step through its message)."""
    from wasi_compress.analysis import analyze
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.modules.training import ASILinear, WASILinear
    from wasi_compress.transforms import WasiConfig, prepare_training_

    torch.set_num_threads(1)
    out: dict[str, Any] = {"model": entry.name, "img_size": entry.img_size}
    t0 = time.time()
    loaded = load(entry)
    doc = analyze(loaded, batch_size=1, spec=entry.spec)
    out["linears"] = len(doc["layers"])
    out["capture"] = doc["capture"]
    out["skipped"] = len(doc["skipped"])
    out["bytes"] = doc["totals"]["weight_bytes"]
    budget = doc["totals"]["weight_bytes"] // 2
    ckpt, onnx = workdir / f"{entry.name.replace(':', '_')}.safetensors", workdir / f"{entry.name.replace(':', '_')}.onnx"
    # a model that runs at any size is rebuilt at its default size: the checkpoint names no img_size
    source = {"arch": entry.spec, "num_classes": None, "img_size": entry.img_size if entry.img_kwarg else None}
    result = convert(loaded, ConvertConfig(budget=budget, output=str(ckpt), onnx=str(onnx), opset=entry.opset), source=source)
    rep = result.report
    assert rep["total_bytes"] <= budget, (rep["total_bytes"], budget)
    out["converted_bytes"] = rep["total_bytes"]
    out["factored"] = sum(layer["rank"] is not None for layer in rep["layers"])
    out["onnx_rel_diff"] = rep["onnx"].get("rel_diff", rep["onnx"].get("max_abs_diff"))
    restored = wasi_compress.load(ckpt, trust_code=True)
    x = torch.randn(2, *loaded.input_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), result.model.eval()(x), rtol=0, atol=0)
    model = copy.deepcopy(loaded.model)
    # exact saved inputs: the Tucker factors' first SVDs would double the sweep's time (tested elsewhere)
    handle = prepare_training_(model, WasiConfig(activation_threshold=None), example=x)
    replaced = sum(isinstance(m, (WASILinear, ASILinear)) for m in handle.model.modules())
    out["wasi_layers"] = replaced
    assert replaced > 0, "WASI replaced no layer"
    trained = handle.model.train()
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.01)
    handle.attach(opt)
    logits = trained(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    loss = F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), loss
    out["seconds"] = round(time.time() - t0, 1)
    return out
