"""Memory-saving forms of what a transformer block saves besides linear inputs (issue 13): LayerNorm that
saves its output, activation derivative codes, fused attention. Gradients are checked against autograd's,
saved bytes are measured with saved_tensors_hooks (``wasi_compress.measure``), and ``SavedFormsPass`` is
run on timm models and on a traced graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wasi_compress.marks import mark_of
from wasi_compress.measure import SavedActivationMeter, measure_saved_activations
from wasi_compress.modules.saved_forms import (
    STEP_DERIVATIVE,
    CodedGELU,
    CodedSiLU,
    MaskedReLU,
    SharedOutputLayerNorm,
    derivative_error,
    exact_grad,
    fit_step_derivative,
    pack_codes,
    unpack_codes,
    use_fused_attention_,
)
from wasi_compress.passes.base import META_KEY
from wasi_compress.passes.saved_forms import SavedFormsPass

torch.set_num_threads(1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """(output, gradients of <output, dy> w.r.t. the input and each parameter)."""
    x = x.clone().requires_grad_()
    y = module(x)
    return y, torch.autograd.grad(y, [x, *module.parameters()], dy)


# ---------------------------------------------------------------- LayerNorm


def _layernorm(width: int, **kwargs) -> nn.LayerNorm:
    """A LayerNorm with trained-looking affine parameters (not a fresh layer's ones and zeros)."""
    torch.manual_seed(0)
    ln = nn.LayerNorm(width, **kwargs)
    with torch.no_grad():
        if ln.weight is not None:
            ln.weight.normal_(1.0, 0.5)
        if ln.bias is not None:
            ln.bias.normal_(0.0, 0.5)
    return ln


LAYERNORM_CASES = {
    "tokens": ((2, 7, 16), {}),
    "swin_4d": ((2, 3, 5, 16), {}),
    "no_affine": ((2, 7, 16), {"elementwise_affine": False}),
    "no_bias": ((2, 3, 5, 16), {"bias": False}),
    "float64": ((2, 7, 16), {"dtype": torch.float64}),
}


@pytest.mark.parametrize("shape,kwargs", LAYERNORM_CASES.values(), ids=LAYERNORM_CASES.keys())
def test_shared_output_layernorm_gradients_equal_autograds(shape, kwargs):
    ln = _layernorm(shape[-1], **kwargs)
    form = SharedOutputLayerNorm.from_layernorm(ln)
    shared = list(zip(form.parameters(), ln.parameters()))
    assert len(shared) == len(list(ln.parameters())) and all(a is b for a, b in shared)
    dtype = kwargs.get("dtype", torch.float32)
    x, dy = (torch.randn(shape) * 3 + 1).to(dtype), torch.randn(shape).to(dtype)
    expected_y, expected = _grads(ln, x, dy)
    y, grads = _grads(form, x, dy)
    assert torch.equal(y, expected_y)  # the same kernel: bit-identical forward
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_layernorm_with_zero_or_tiny_gamma_keeps_xhat_and_stays_exact():
    """xhat = (y - beta) / gamma fails where gamma is 0 (division by zero) or tiny beside beta (y's rounding
    error amplified 1e8 times): the form keeps xhat then, and the gradient is still autograd's."""
    ln = _layernorm(16)
    with torch.no_grad():
        ln.weight[3] = 0.0
        ln.weight[5] = 1e-7
        ln.bias[5] = 10.0
    x, dy = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    _, expected = _grads(ln, x, dy)
    form = SharedOutputLayerNorm.from_layernorm(ln)
    _, grads = _grads(form, x, dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.isfinite(grads[0]).all()


def test_layernorm_then_linear_saves_one_unit_and_rstd():
    """The form saves its output, which the next linear saves anyway (one storage, counted once), and N
    floats of rstd; the plain LayerNorm saves its input, mean and rstd beside the linear's input."""
    b, n, c = 4, 10, 16
    unit, per_token = b * n * c * 4, b * n * 4
    ln = _layernorm(c)
    cases = ((ln, 2 * unit + 2 * per_token, unit + 2 * per_token),
             (SharedOutputLayerNorm.from_layernorm(ln), unit + per_token, per_token))
    for norm, expected_total, expected_norm in cases:
        model = nn.Sequential(norm, nn.Linear(c, c))
        meter = SavedActivationMeter(model, linear_weights={"1": [model[1].weight]}, by_family=True)
        with meter:
            model(torch.randn(b, n, c, requires_grad=True))
        assert meter.total_bytes == expected_total
        assert meter.per_family["layernorm"] == expected_norm
        assert meter.per_family["linear_inputs"] == unit


def test_layernorm_form_converts_back_with_the_same_parameters():
    ln = _layernorm(8)
    back = SharedOutputLayerNorm.from_layernorm(ln).to_layernorm()
    assert back is ln and back.weight is ln.weight
    fresh = SharedOutputLayerNorm(8).to_layernorm()
    assert type(fresh) is nn.LayerNorm and fresh.weight.shape == (8,)


def test_forms_compute_the_plain_forward_without_grad():
    x = torch.randn(3, 5, 8)
    ln = _layernorm(8)
    pairs = ((SharedOutputLayerNorm.from_layernorm(ln), ln), (CodedGELU(bits=2), nn.GELU()),
             (CodedSiLU(bits=8), nn.SiLU()), (MaskedReLU(), nn.ReLU()))
    with torch.no_grad():
        for form, plain in pairs:
            assert torch.equal(form(x), plain(x))


# ---------------------------------------------------------------- activation codes


ACTIVATIONS = {
    "gelu": (lambda bits: CodedGELU(bits=bits), nn.GELU(), "gelu"),
    "gelu_tanh": (lambda bits: CodedGELU("tanh", bits), nn.GELU("tanh"), "gelu_tanh"),
    "silu": (lambda bits: CodedSiLU(bits=bits), nn.SiLU(), "silu"),
}


@pytest.mark.parametrize("make,plain,kind", ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_activation_codes_keep_the_output_and_bound_the_gradient_error(make, plain, kind):
    """Measured for z, dy ~ N(0, 1): 8-bit about 0.007 (GELU) / 0.008 (SiLU), 2-bit about 0.13 / 0.14."""
    gen = torch.Generator().manual_seed(0)
    z, dy = torch.randn(64, 256, generator=gen), torch.randn(64, 256, generator=gen)
    expected_y, (expected,) = _grads(plain, z, dy)
    errors = {}
    for bits in (8, 2):
        y, (dz,) = _grads(make(bits), z, dy)
        assert torch.equal(y, expected_y)
        errors[bits] = _relative(dz, expected)
        assert errors[bits] == pytest.approx(derivative_error(kind, bits), rel=0.1)
    assert errors[8] < 1e-2
    assert 0.05 < errors[2] < 0.16
    assert errors[8] < errors[2] / 10


def test_masked_relu_is_exact():
    z, dy = torch.randn(5, 7, 9), torch.randn(5, 7, 9)
    expected_y, (expected,) = _grads(nn.ReLU(), z, dy)
    y, (dz,) = _grads(MaskedReLU(), z, dy)
    assert torch.equal(y, expected_y) and torch.equal(dz, expected)
    assert derivative_error("relu", 1) == 0.0


@pytest.mark.parametrize("form,expected_bytes", [(nn.GELU(), 4 * 640), (CodedGELU(bits=8), 640),
                                                 (CodedGELU(bits=2), 160), (CodedSiLU(bits=2), 160),
                                                 (MaskedReLU(), 80)])
def test_activation_saved_bytes(form, expected_bytes):
    """640 elements: float32 input 2560 bytes, 8-bit code 640, 2-bit code 160 (numel/4), 1-bit mask 80."""
    meter = SavedActivationMeter(form, by_family=True)
    with meter:
        form(torch.randn(4, 10, 16, requires_grad=True))
    assert meter.total_bytes == meter.per_family["activation"] == expected_bytes


def test_codes_of_a_size_not_a_multiple_of_the_byte():
    z, dy = torch.randn(3, 5, 7), torch.randn(3, 5, 7)  # 105 elements: 27 bytes of 2-bit codes
    meter = SavedActivationMeter(CodedGELU(bits=2))
    with meter:
        y = meter.model(z.requires_grad_())
    assert meter.total_bytes == 27
    (dz,) = torch.autograd.grad(y, z, dy)
    assert dz.shape == z.shape and _relative(dz, exact_grad(dy, z.detach(), "gelu")) < 0.16


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


@pytest.mark.parametrize("kind", ["gelu", "silu"])
def test_step_table_is_the_fit_and_beats_regelu2s_published_levels(kind):
    """STEP_DERIVATIVE is what fit_step_derivative gives (here on a coarser grid), and its gradient error
    for z ~ N(0, 1) is below that of Approx-BP's published ReGELU2 / ReSiLU2 steps (0.36 / 0.47)."""
    breaks, levels = fit_step_derivative(kind, points=16001)
    assert breaks == pytest.approx(STEP_DERIVATIVE[kind][0], abs=2e-3)
    assert levels == pytest.approx(STEP_DERIVATIVE[kind][1], abs=2e-3)
    published = {"gelu": ((-3.1859, -0.0012, 3.1908), (0.0, -0.0492, 1.0487, 1.0)),
                 "silu": ((-6.3050, -0.0009, 6.3258), (0.0, -0.0406, 1.0403, 1.0))}[kind]
    gen = torch.Generator().manual_seed(0)
    z, dy = torch.randn(1 << 16, generator=gen), torch.randn(1 << 16, generator=gen)
    regelu = dy * torch.tensor(published[1])[torch.bucketize(z, torch.tensor(published[0]))]
    published_error = _relative(regelu, exact_grad(dy, z, kind))
    assert published_error > 0.3 > 2 * derivative_error(kind, 2)


def test_bits_are_checked():
    with pytest.raises(ValueError, match="bits"):
        CodedGELU(bits=4)


# ---------------------------------------------------------------- attention


def _saved_shapes(run) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        run()
    return shapes


def _qkv(requires_grad: bool = True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 17, 8, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


SDPA_FUSED = {"plain": {}, "causal": {"is_causal": True},
              "bool_mask": {"attn_mask": torch.ones(17, 17, dtype=torch.bool).tril()},
              "float_mask": {"attn_mask": torch.zeros(2, 1, 17, 17)}}


@pytest.mark.parametrize("kwargs", SDPA_FUSED.values(), ids=SDPA_FUSED.keys())
def test_sdpa_cpu_fused_kernel_saves_no_probabilities(kwargs):
    """What the module docstring states: q, k, v, the output and the log-sum-exp (B, H, N), no (B, H, N, N)."""
    q, k, v = _qkv()
    shapes = _saved_shapes(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
    assert (2, 3, 17, 17) not in shapes and (2, 3, 17) in shapes
    assert shapes.count((2, 3, 17, 8)) == 4


def test_sdpa_falls_back_to_saving_probabilities_with_dropout_or_a_trainable_mask():
    q, k, v = _qkv()
    dropout = _saved_shapes(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
    mask = torch.zeros(1, 3, 17, 17, requires_grad=True)
    trainable_mask = _saved_shapes(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert (2, 3, 17, 17) in dropout and (2, 3, 17, 17) in trainable_mask
    with torch.no_grad():
        assert _saved_shapes(lambda: F.scaled_dot_product_attention(q, k, v)) == []
    assert _saved_shapes(lambda: F.scaled_dot_product_attention(*_qkv(requires_grad=False))) == []


def _unfused(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def test_use_fused_attention_saves_the_probabilities(vit_models):
    """timm ViT, 4 images of 5 tokens, 2 heads, 2 blocks: the fused path saves exactly B H (N^2 - N) floats
    a block less (the probabilities, less the log-sum-exp)."""
    model = _unfused(vit_models.tiny_timm_vit())
    x = torch.randn(4, 1, 8, 8)
    before = measure_saved_activations(model, x).total_bytes
    assert use_fused_attention_(model) == ["blocks.0.attn", "blocks.1.attn"]
    after = measure_saved_activations(model, x).total_bytes
    assert before - after == 2 * (4 * 2 * (5 * 5 - 5)) * 4
    assert use_fused_attention_(model) == []


# ---------------------------------------------------------------- the pass


def _linear_weights(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {name: [m.weight] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _loss_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _saved(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    return measure_saved_activations(model, x, linear_weights=_linear_weights(model)).per_family


# relative error of all parameter gradients of a mean-square loss; measured 1e-7, 0.003 and 0.09
VIT_TOLERANCE = {"exact": 1e-5, "code8": 2e-2, "code2": 0.25}


@pytest.mark.parametrize("activation", VIT_TOLERANCE)
def test_pass_on_timm_vit_keeps_outputs_and_saves_less_by_family(vit_models, activation):
    model = _unfused(vit_models.tiny_timm_vit())
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    expected_out, expected_grads = _loss_and_grads(reference, x)
    before = _saved(reference, x)
    result = SavedFormsPass(activation=activation)(model)
    assert result.modified and result.graph_module is model
    out, grads = _loss_and_grads(model, x)
    torch.testing.assert_close(out, expected_out)  # attention switched kernels: equal to float tolerance
    assert _relative(grads, expected_grads) < VIT_TOLERANCE[activation]
    after = _saved(model, x)
    assert after["layernorm"] == 5 * (8 * 5) * 4  # 5 LayerNorms keep only rstd: their outputs are linear inputs
    assert after["activation"] == before["activation"] // {"exact": 1, "code8": 4, "code2": 16}[activation]
    assert after["attention"] < before["attention"]
    assert after["linear_inputs"] == before["linear_inputs"]


def test_pass_marks_and_reverse_gives_back_the_modules_and_outputs(vit_models):
    model = _unfused(vit_models.tiny_timm_vit())
    kinds = {name: m for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GELU))}
    parameters = list(model.parameters())
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    forms = SavedFormsPass(activation="code2")
    forms(model)
    assert set(forms.replaced) == set(kinds) and forms.fused == ["blocks.0.attn", "blocks.1.attn"]
    assert mark_of(model.blocks[0].norm1, "saved_forms") == {"original": "timm.layers.norm.LayerNorm", "form": "shared"}
    assert mark_of(model.blocks[0].mlp.act, "saved_forms")["form"] == "code2"
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert forms.reverse(model).modified
    assert all(model.get_submodule(name) is module for name, module in kinds.items())
    assert not any(mark_of(m, "saved_forms") for m in model.modules())
    assert model.blocks[0].attn.fused_attn is False
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert torch.equal(model(x), expected)


def test_pass_restricted_to_blocks(vit_models):
    model = vit_models.tiny_timm_vit()
    norm = model.norm
    forms = SavedFormsPass(blocks=["blocks.1"], attention="as-is")
    forms(model)
    assert set(forms.replaced) == {"blocks.1.norm1", "blocks.1.norm2", "blocks.1.mlp.act"}
    assert model.norm is norm and type(model.blocks[0].mlp.act) is nn.GELU


def test_pass_on_swin_4d_layernorms(vit_models):
    """Swin's LayerNorms see (B, H, W, C); eval mode switches drop-path off (gradients still flow).
    Attention stays as it is: Swin's mask carries a trainable bias, so SDPA would save more on CPU."""
    model = vit_models.tiny_swin().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    expected_out, expected_grads = _loss_and_grads(reference, x)
    forms = SavedFormsPass(activation="code8", attention="as-is")
    forms(model)
    assert "layers.0.blocks.0.norm1" in forms.replaced and "layers.1.downsample.norm" in forms.replaced
    out, grads = _loss_and_grads(model.eval(), x)
    assert torch.equal(out, expected_out)
    assert _relative(grads, expected_grads) < 2e-2  # measured 6e-4
    before, after = _saved(reference, x), _saved(model, x)
    assert after["layernorm"] < before["layernorm"] and after["activation"] == before["activation"] // 4
    assert sum(after.values()) < sum(before.values())


def test_pass_on_a_traced_graph(vit_models):
    """fx traces through timm's LayerNorm (F.layer_norm on get_attr parameters): the calls become the
    form, installed where the parameters live, so the state dict keeps its keys; reverse restores the calls."""
    from wasi_compress.passes.capture import trace

    gm = trace(vit_models.tiny_timm_vit())
    x = torch.randn(4, 1, 8, 8)
    keys = list(gm.state_dict())
    expected_out, expected_grads = _loss_and_grads(gm, x)
    forms = SavedFormsPass(activation="code8")
    forms(gm)
    assert isinstance(gm.get_submodule("blocks.0.norm1"), SharedOutputLayerNorm)
    assert forms.replaced["blocks.0.norm1"] == "shared" and forms.replaced["blocks.0.mlp.act"] == "code8"
    marked = {n.target for n in gm.graph.nodes if "saved_forms" in n.meta.get(META_KEY, {})}
    assert marked == set(forms.replaced)
    assert not any(n.target is F.layer_norm for n in gm.graph.nodes)
    assert list(gm.state_dict()) == keys
    out, grads = _loss_and_grads(gm, x)
    assert torch.equal(out, expected_out) and _relative(grads, expected_grads) < 2e-2
    assert _saved(gm, x)["layernorm"] == 5 * (4 * 5) * 4
    forms.reverse(gm)
    assert sum(n.target is F.layer_norm for n in gm.graph.nodes) == 5
    assert not any(isinstance(m, (SharedOutputLayerNorm, CodedGELU)) for m in gm.modules())
    assert list(gm.state_dict()) == keys and torch.equal(gm(x), expected_out)


def test_functional_activations_in_a_graph(vit_models):
    """structured_mlp calls F.gelu: in its graph each call becomes a CodedGELU, and back."""
    from wasi_compress.passes.capture import trace

    gm = trace(vit_models.structured_mlp())
    x = torch.randn(6, 1, 8, 8)
    expected = gm(x)
    forms = SavedFormsPass(activation="code2")
    forms(gm)
    assert sorted(forms.replaced) == ["saved_forms_gelu", "saved_forms_gelu_1"]
    assert torch.equal(gm(x), expected)
    meter = SavedActivationMeter(gm, by_family=True)
    with meter:
        gm(x)
    assert meter.per_family["activation"] == 2 * (6 * 96) // 4
    forms.reverse(gm)
    assert sum(n.target is F.gelu for n in gm.graph.nodes) == 2 and not hasattr(gm, "saved_forms_gelu")


def test_a_module_used_twice_gets_one_form():
    act = nn.GELU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    forms = SavedFormsPass()
    forms(model)
    assert isinstance(model[1], CodedGELU) and model[1] is model[3]
    forms.reverse(model)
    assert model[1] is act and model[3] is act


def test_exact_options_change_nothing_and_bad_options_are_refused():
    model = nn.Sequential(nn.LayerNorm(4), nn.GELU())
    result = SavedFormsPass(layernorm="exact", activation="exact", attention="as-is")(model)
    assert not result.modified and type(model[0]) is nn.LayerNorm
    with pytest.raises(ValueError, match="activation"):
        SavedFormsPass(activation="code4")
