"""Frozen parameters kept in bfloat16 (wasi_compress.frozen_storage): the step it trains, the bytes it saves,
deep copies, restore, and the planner's and the command's use of it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.errors import UserError
from wasi_compress.finetune import FinetuneConfig, finetune, measure_step
from wasi_compress.frozen_storage import frozen_bytes, restore_frozen_dtype_, rounding_error, store_frozen_in_
from wasi_compress.step_plan import ActivationFit, StepLevers, StepModel, plan_step
from wasi_compress.transforms.config import WasiConfig
from wasi_compress.transforms.training import prepare_training_

torch.set_num_threads(1)


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def prepared(vit_models):
    x, _ = _batch()
    return prepare_training_(vit_models.tiny_timm_vit(), WasiConfig(finetune_last=1), example=x[:2])


def _rounded(model, names):
    """`model` with the named parameters rounded to bfloat16 and kept in float32: what the lever computes."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(params[name].to(torch.bfloat16).float())
    return twin


def _trained_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_bfloat16_frozen_parameters_train_as_their_rounded_float32_values(prepared):
    x, y = _batch()
    model = prepared.model
    before = copy.deepcopy(model)
    stored = store_frozen_in_(model, prepared.frozen)
    assert stored and all(dict(model.named_parameters())[n].dtype == torch.bfloat16 for n in stored)
    # the model's own pos_embed and cls_token run in the model's forward, around trained blocks: left as they are
    assert "pos_embed" not in stored and dict(model.named_parameters())["pos_embed"].dtype == torch.float32
    reference = _rounded(before, stored)
    ours, theirs = _trained_grads(model, x, y), _trained_grads(reference, x, y)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(dict(model.named_parameters())[n].dtype == torch.bfloat16 for n in stored)  # swapped back


def test_the_rounding_is_the_only_change_and_its_error_is_stated(prepared):
    x, y = _batch()
    before = copy.deepcopy(prepared.model)
    error = rounding_error(before, prepared.frozen)
    assert 0 < error < 2 ** -7
    store_frozen_in_(prepared.model, prepared.frozen)
    rounded = _rounded(before, [n for n, p in prepared.model.named_parameters() if p.dtype == torch.bfloat16])
    with torch.no_grad():
        torch.testing.assert_close(prepared.model.eval()(x), rounded.eval()(x), rtol=1e-5, atol=1e-6)


def test_stored_parameters_take_half_the_bytes_and_the_measured_peak_drops_by_that(prepared):
    x, y = _batch(64)
    saving = frozen_bytes(prepared.model, prepared.frozen)
    plain = copy.deepcopy(prepared.model)
    store_frozen_in_(prepared.model, prepared.frozen)

    def peak(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        return measure_step(model, opt, x, y, linears={})["peak_bytes"]

    assert saving > 0
    assert peak(plain) - peak(prepared.model) == pytest.approx(saving, rel=0.05)


def test_a_deep_copy_keeps_its_own_storage_and_restore_undoes_it(prepared):
    x, _ = _batch()
    store_frozen_in_(prepared.model, prepared.frozen)
    twin = copy.deepcopy(prepared.model)
    restored = restore_frozen_dtype_(twin)
    assert restored and all(p.dtype == torch.float32 for p in twin.parameters())
    assert not twin.patch_embed.proj._forward_pre_hooks and not twin.patch_embed.proj._forward_hooks
    assert prepared.model.patch_embed.proj.weight.dtype == torch.bfloat16  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), prepared.model.eval()(x))


def test_a_trained_parameter_is_refused(prepared):
    trained = next(n for n, p in prepared.model.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match="not a frozen parameter"):
        store_frozen_in_(prepared.model, [trained])


def test_the_planner_stores_frozen_parameters_in_bfloat16_only_when_it_must():
    fits = {StepLevers(2).fit_key: ActivationFit((1, 2), (10, 20))}
    model = StepModel(batch_size=8, fixed_bytes=1000, fixed_grad_bytes=0, batch_bytes=0, weight_layers=(),
                      grad_share=0.0, fits=fits, end_terms={}, frozen_saving_bytes=300)
    options = [StepLevers(2, frozen_dtype=d) for d in ("float32", "bfloat16")]
    errors = {("frozen_dtype", "bfloat16"): 0.004}
    roomy = plan_step(model, 1100, lever_errors=errors, options=options)
    assert roomy.levers.frozen_dtype == "float32" and roomy.predicted["peak"] == 1040
    tight = plan_step(model, 800, lever_errors=errors, options=options)
    assert tight.levers.frozen_dtype == "bfloat16" and tight.predicted["peak"] == 740
    assert tight.error["levers"] == pytest.approx(0.004)


def test_frozen_dtype_needs_something_frozen():
    with pytest.raises(UserError, match="--finetune-last"):
        FinetuneConfig(model="builtin:mnist-vit", data="digits", frozen_dtype="bfloat16")
    with pytest.raises(UserError, match="--frozen-dtype must be"):
        FinetuneConfig(model="builtin:mnist-vit", data="digits", finetune_last=1, frozen_dtype="float16")


@pytest.mark.slow
def test_finetune_with_bfloat16_frozen_parameters_writes_a_float32_checkpoint(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "o.safetensors"
    common = dict(model="vit_models:tiny_timm_vit", data="digits", epochs=1, batch_size=64, finetune_last=1, seed=3)
    plain = finetune(FinetuneConfig(**common)).doc
    doc = finetune(FinetuneConfig(**common, frozen_dtype="bfloat16", output=str(out))).doc
    assert doc["levers"]["frozen_dtype"] == "bfloat16"
    assert doc["memory"]["peak_bytes"] < plain["memory"]["peak_bytes"]
    assert abs(doc["final"]["accuracy"] - plain["final"]["accuracy"]) < 0.05
    with safe_open(str(out), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys() if f.get_tensor(k).is_floating_point())
