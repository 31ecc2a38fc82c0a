"""Training memory: saved activations MEASURED with saved_tensors_hooks (each storage once, parameters
excluded) on small nets whose bytes are worked out by hand; parameters, gradients and optimizer state
derived from tensor sizes; FLOPs counted by fvcore, fused attention included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wasi_compress.flops import count_flops
from wasi_compress.measure import FAMILIES, SavedActivationMeter, measure_saved_activations, storage_bytes, train_memory

F32 = 4  # bytes per float32 element


def _mlp(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4))


def _weights(model: nn.Sequential) -> dict[str, list[torch.Tensor]]:
    return {name: [m.weight] for name, m in model.named_children() if isinstance(m, nn.Linear)}


# --------------------------------------------------------------------------------------------------
# saved activations, by hand
#
# Linear(8,16) -> act -> Linear(16,4) at batch 3, float32. Autograd saves, for backward:
#   fc1 (addmm): its input x, 3 x 8 (its weight too, but a parameter is not an activation);
#   ReLU: its OUTPUT (threshold_backward needs the result), 3 x 16;
#   GELU: its INPUT (the derivative is evaluated at the input), 3 x 16;
#   fc2 (addmm): its input, the activation's output, 3 x 16.
# With ReLU, its saved output IS fc2's saved input: one storage, counted once.


def test_mlp_relu_saved_bytes_by_hand():
    model = _mlp(nn.ReLU())
    saved = measure_saved_activations(model, torch.randn(3, 8), linear_weights=_weights(model))
    x_bytes, hidden_bytes = 3 * 8 * F32, 3 * 16 * F32  # 96, 192
    assert saved.total_bytes == x_bytes + hidden_bytes == 288  # ReLU's output and fc2's input: stored once
    assert saved.linear_input_bytes == x_bytes + hidden_bytes == 288
    assert saved.per_linear == {"0": x_bytes, "2": hidden_bytes}


def test_mlp_gelu_saved_bytes_by_hand():
    model = _mlp(nn.GELU())
    saved = measure_saved_activations(model, torch.randn(3, 8), linear_weights=_weights(model))
    x_bytes, hidden_bytes = 3 * 8 * F32, 3 * 16 * F32
    assert saved.total_bytes == x_bytes + hidden_bytes + hidden_bytes == 480  # GELU keeps fc1's output besides
    assert saved.linear_input_bytes == 288
    assert saved.per_linear == {"0": 96, "2": 192}


def test_three_dimensional_input_by_hand():
    """Token-shaped input (batch 2, 5 tokens): linear saves a reshaped view of its input, same storage."""
    model = _mlp(nn.ReLU())
    saved = measure_saved_activations(model, torch.randn(2, 5, 8), linear_weights=_weights(model))
    assert saved.total_bytes == 2 * 5 * 8 * F32 + 2 * 5 * 16 * F32 == 960
    assert saved.per_linear == {"0": 320, "2": 640}


def test_without_linear_weights_only_the_total_is_measured():
    model = _mlp(nn.GELU())
    saved = measure_saved_activations(model, torch.randn(3, 8))
    assert (saved.total_bytes, saved.linear_input_bytes, saved.per_linear) == (480, 0, {})


def test_frozen_first_layer_saves_less():
    """Measured, not assumed: with fc1 frozen and an input that needs no gradient, nothing upstream of fc2
    needs a gradient, so neither x nor the ReLU output is saved for them; only fc2's input (for its
    weight gradient) is."""
    model = _mlp(nn.ReLU())
    model[0].requires_grad_(False)
    saved = measure_saved_activations(model, torch.randn(3, 8), linear_weights=_weights(model))
    assert saved.total_bytes == 3 * 16 * F32 == 192
    assert saved.per_linear == {"2": 192}


class _SharedInput(nn.Module):
    """h feeds four linears: twice whole, twice through column slices (views of h's storage)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16, bias=False)
        self.a = nn.Linear(16, 4)
        self.b = nn.Linear(16, 4)
        self.c = nn.Linear(8, 4)
        self.d = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.a(h) + self.b(h) + self.c(h[:, :8]) + self.d(h[:, 8:])


def test_tensors_sharing_storage_count_once():
    model = _SharedInput()
    weights = {name: [m.weight] for name, m in model.named_children()}
    saved = measure_saved_activations(model, torch.randn(3, 8), linear_weights=weights)
    # x (saved by fc1) + h's storage once, although a, b, c and d each saved h or a view of it
    assert saved.total_bytes == 3 * 8 * F32 + 3 * 16 * F32 == 288
    assert saved.linear_input_bytes == 288
    assert sum(saved.per_linear.values()) == 288 and saved.per_linear["fc1"] == 96


def test_views_of_one_storage_count_as_the_whole_storage_once():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(8, 4)
            self.d = nn.Linear(8, 4)

        def forward(self, x):
            h = x * 2.0  # multiplying by a Python number saves nothing
            return self.c(h[:, :8]) + self.d(h[:, 8:])

    model = Halves()
    saved = measure_saved_activations(model, torch.randn(3, 16), linear_weights={"c": [model.c.weight], "d": [model.d.weight]})
    assert saved.total_bytes == 3 * 16 * F32 == 192  # not 2 x 96 and not 0: one storage, whole


def test_parameters_and_buffers_are_not_activations():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))
            self.register_buffer("m", torch.randn(8))

        def forward(self, x):
            # x * w: only w needs a gradient, for which autograd saves x (w itself would serve x's gradient,
            # which is not needed). (x * w) * m: m serves the gradient of x * w, so m is saved; x * w would
            # serve m's gradient, not needed. So autograd saves x and the buffer m.
            return (x * self.w * self.m).sum()

    saved = measure_saved_activations(Scale(), torch.randn(3, 8))
    assert saved.total_bytes == 3 * 8 * F32  # x only: the saved buffer m is not an activation


def test_measurement_leaves_the_model_as_it_was():
    model = _mlp(nn.ReLU()).eval()
    measure_saved_activations(model, torch.randn(3, 8))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    measure_saved_activations(model, torch.randn(3, 8))
    assert model.training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[2].weight.grad is None


def test_custom_loss_and_forward_only():
    model = _mlp(nn.ReLU())
    forward_only = measure_saved_activations(model, torch.randn(3, 8), backward=False)
    with_loss = measure_saved_activations(model, torch.randn(3, 8), loss_fn=lambda out: out.sum())
    assert forward_only.total_bytes == with_loss.total_bytes == 288


def test_measured_on_a_hand_written_vit_linear_inputs(vit_models):
    """Every linear's saved input is measured: per layer it is at least the input's own bytes (a view,
    such as the head's class token, holds its whole storage)."""
    from wasi_compress.passes.capture import capture

    model = vit_models.functional_head_vit()
    x = torch.randn(2, 3, 32, 32)
    cap = capture(model, x)
    weights = {s.name: [model.get_parameter(s.weight_name)] for s in cap.sites}
    saved = measure_saved_activations(model, x, linear_weights=weights)
    tokens, dim = 17, vit_models.DIM
    for site in cap.sites[:-1]:
        assert saved.per_linear[site.name] == 2 * tokens * site.in_features * F32
    # the head's input is x[:, 0] of the final norm's output: that whole storage stays alive
    assert saved.per_linear["head_weight"] == 2 * tokens * dim * F32
    assert saved.linear_input_bytes == sum(saved.per_linear.values()) < saved.total_bytes


# --------------------------------------------------------------------------------------------------
# derived figures


def test_train_memory_derived_figures_by_hand():
    model = _mlp(nn.ReLU())
    params_bytes = (8 * 16 + 16 + 16 * 4 + 4) * F32  # 848
    tm = train_memory(list(model.parameters()), 288)
    assert tm["params_bytes"] == tm["grads_bytes"] == params_bytes == 848
    assert tm["optimizer_bytes"] == {"sgd_momentum": 848, "adamw": 1696}
    assert tm["saved_activation_bytes"] == 288
    assert tm["total_bytes"] == 848 + 848 + 1696 + 288
    assert tm["sources"]["saved_activation_bytes"].startswith("measured")
    assert all(tm["sources"][k].startswith("derived") for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes"))


def test_frozen_parameters_have_no_gradient_or_optimizer_state():
    model = _mlp(nn.ReLU())
    model[0].requires_grad_(False)
    tm = train_memory(list(model.parameters()), 0)
    assert tm["params_bytes"] == 848
    assert tm["grads_bytes"] == (16 * 4 + 4) * F32 == 272
    assert tm["optimizer_bytes"] == {"sgd_momentum": 272, "adamw": 544}


def test_tied_and_viewed_tensors_count_once():
    w = torch.randn(4, 6)
    assert storage_bytes([w, w, w.t(), w[1:]]) == 4 * 6 * F32
    assert storage_bytes([w, torch.randn(2, dtype=torch.float64)]) == 96 + 16
    shared = nn.Linear(6, 4)
    tied = nn.Linear(6, 4)
    tied.weight = shared.weight
    params = list(shared.parameters()) + list(tied.parameters())
    assert train_memory(params, 0)["params_bytes"] == (24 + 4 + 4) * F32


def test_half_precision_bytes():
    w = torch.zeros(10, 10, dtype=torch.float16)
    assert storage_bytes([w]) == 200


# --------------------------------------------------------------------------------------------------
# FLOPs (fvcore convention: one multiply-add = 1 FLOP)


def test_flops_of_the_mlp_by_hand():
    flops = count_flops(_mlp(nn.GELU()), torch.randn(3, 8))
    assert flops["total"] == 3 * 8 * 16 + 3 * 16 * 4 == 576  # elementwise GELU not counted
    assert "multiply-add = 1 FLOP" in flops["convention"]


def test_fused_attention_is_counted():
    class SDPA(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q[..., :6])

    b, h, n, d, dv = 2, 3, 5, 8, 6
    flops = count_flops(SDPA(), torch.randn(b, h, n, d))
    assert flops["total"] == b * h * n * n * (d + dv)  # QK^T: b h n n d multiply-adds; AV: b h n n dv


def test_count_flops_restores_training_mode():
    model = _mlp(nn.ReLU()).train()
    count_flops(model, torch.randn(3, 8))
    assert model.training


def test_hand_written_vit_flops_by_hand(vit_models):
    """Linears + patch-embedding conv + fused attention + LayerNorm (fvcore: 5 per element with affine)."""
    model = vit_models.functional_head_vit()
    b, tokens, dim, hidden, classes = 2, 17, vit_models.DIM, vit_models.MLP_RATIO * vit_models.DIM, 10
    linear = b * tokens * (dim * 3 * dim + dim * dim + dim * hidden + hidden * dim) * vit_models.DEPTH + b * dim * classes
    conv = b * 16 * (3 * vit_models.PATCH * vit_models.PATCH) * dim
    head_dim = dim // vit_models.HEADS
    attention = vit_models.DEPTH * b * vit_models.HEADS * tokens * tokens * (head_dim + head_dim)
    norms = (2 * vit_models.DEPTH + 1) * b * tokens * dim * 5
    flops = count_flops(model, torch.randn(b, 3, 32, 32))
    assert flops["total"] == linear + conv + attention + norms


# --------------------------------------------------------------------------------------------------
# one meter: per module (innermost watched module) and per linear (by F.linear weight) on the same step


def test_one_meter_gives_per_module_and_per_linear_figures_by_hand():
    """The figures the two former meters gave on Linear(8,16) -> ReLU -> Linear(16,4) at batch 3: per
    watched module (fc1 saves x, 96 B; fc2 saves the ReLU output, 192 B, which is ReLU's own saved output
    too: counted once, under fc2, the first watched module that saved it) and per linear by weight."""
    model = _mlp(nn.ReLU())
    x = torch.randn(3, 8)
    watch = {"fc1": model[0], "fc2": model[2]}
    with SavedActivationMeter(model, watch, linear_weights=_weights(model)) as meter:
        out = model(x)
    out.square().mean().backward()
    assert meter.total_bytes == 288
    assert meter.per_module == {"fc1": 96, "fc2": 192}
    assert meter.per_linear == {"0": 96, "2": 192} and meter.linear_input_bytes == 288
    model.zero_grad(set_to_none=True)
    saved = measure_saved_activations(model, x, linear_weights=_weights(model))
    assert (saved.total_bytes, saved.linear_input_bytes, saved.per_linear) == (288, 288, {"0": 96, "2": 192})


def test_meter_attributes_to_the_innermost_watched_module():
    model = _mlp(nn.GELU())
    watch = {"all": model, "fc1": model[0], "act": model[1]}
    with SavedActivationMeter(model, watch) as meter:
        model(torch.randn(3, 8))
    # fc1 saves x (96); GELU saves its input, fc1's output (192); fc2's input (192) is saved in "all"
    assert meter.per_module == {"all": 192, "fc1": 96, "act": 192}
    assert meter.total_bytes == 480 and meter.per_linear == {}


def test_meter_excludes_parameters_buffers_and_is_removed_on_exit():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with SavedActivationMeter(model, {"bn": model[1]}) as meter:
        model(torch.randn(5, 4))
    params = {(p.untyped_storage().data_ptr()) for p in [*model.parameters(), *model.buffers()]}
    assert not any(key[0] in params for key in meter.saved)
    before = meter.total_bytes
    model(torch.randn(5, 4))  # hooks removed: nothing more is counted
    assert meter.total_bytes == before and not model[1]._forward_hooks and not model[1]._forward_pre_hooks


# --------------------------------------------------------------------------------------------------
# by op family: linear inputs, LayerNorm, activation functions, attention, other


def _families(**nonzero: int) -> dict[str, int]:
    return {family: nonzero.get(family, 0) for family in FAMILIES}


def test_families_of_the_mlps_by_hand():
    """ReLU's saved output is fc2's input: a linear input, so the ReLU MLP saves nothing else; GELU keeps
    its input (fc1's output, 3 x 16) besides: an activation."""
    relu, gelu = _mlp(nn.ReLU()), _mlp(nn.GELU())
    by_relu = measure_saved_activations(relu, torch.randn(3, 8), linear_weights=_weights(relu)).per_family
    by_gelu = measure_saved_activations(gelu, torch.randn(3, 8), linear_weights=_weights(gelu)).per_family
    assert by_relu == _families(linear_inputs=288)
    assert by_gelu == _families(linear_inputs=288, activation=3 * 16 * F32)


def test_a_model_without_norms_or_attention_saves_none_for_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    saved = measure_saved_activations(model, torch.randn(5, 8), linear_weights=_weights(model))
    assert sum(saved.per_family.values()) == saved.total_bytes
    assert saved.per_family["linear_inputs"] == saved.linear_input_bytes
    assert saved.per_family["layernorm"] == 0 and saved.per_family["attention"] == 0


def test_functional_ops_are_attributed_without_their_modules():
    """F.layer_norm, F.silu and F.scaled_dot_product_attention called in a plain module's forward: the
    functional op running when a tensor is saved decides its family."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            h = F.layer_norm(x * 2, (8,), self.w)  # saves x * 2 (and its mean, rstd)
            h = F.silu(h * 3)  # saves h * 3
            q = h.unsqueeze(1) * 4
            return F.scaled_dot_product_attention(q, q, q)

    saved = measure_saved_activations(Functional(), torch.randn(2, 5, 8))
    fam = saved.per_family
    assert fam["layernorm"] >= 2 * 5 * 8 * F32 and fam["activation"] == 2 * 5 * 8 * F32 and fam["attention"] > 0
    assert fam["linear_inputs"] == 0 and sum(fam.values()) == saved.total_bytes


def test_tiny_timm_vit_families(vit_models):
    """On timm's ViT every family saves something; linear inputs are exactly the per-linear figure and the
    families add up to the whole."""
    from wasi_compress.analysis import site_modules
    from wasi_compress.passes.capture import capture

    model = vit_models.tiny_timm_vit()
    x = torch.randn(2, 1, 8, 8)
    cap = capture(model, x)
    saved = measure_saved_activations(model, x, linear_weights={s.name: site_modules(model, s) for s in cap.sites})
    fam = saved.per_family
    assert set(fam) == set(FAMILIES) and sum(fam.values()) == saved.total_bytes
    assert fam["linear_inputs"] == saved.linear_input_bytes == sum(saved.per_linear.values()) > 0
    assert fam["layernorm"] > 0 and fam["activation"] > 0 and fam["attention"] > 0
    assert fam["other"] >= 2 * 1 * 8 * 8 * F32  # the patch embedding's convolution keeps the image


def test_meter_by_family_is_opt_in_and_leaves_no_hooks():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU())
    with SavedActivationMeter(model) as plain:
        model(torch.randn(3, 8))
    assert plain.per_family == _families(other=plain.total_bytes)  # no families asked for: all "other"
    with SavedActivationMeter(model, by_family=True, linear_weights=_weights(model)) as meter:
        model(torch.randn(3, 8))
    assert meter.per_family["linear_inputs"] == 3 * 8 * F32
    assert meter.per_family["layernorm"] > 0 and meter.per_family["activation"] == 3 * 8 * F32
    assert sum(meter.per_family.values()) == meter.total_bytes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_storage_bytes_skips_meta_and_non_tensors():
    assert storage_bytes([torch.empty(10, device="meta"), "x", torch.zeros(2)]) == 2 * F32


# --------------------------------------------------------------------------------------------------
# analyze/1: every figure's source kind is data (source_kinds), consistent with the prose of sources


def test_analyze_document_records_source_kinds_beside_the_prose():
    from wasi_compress.analysis import analyze
    from wasi_compress.reports import AnalyzeReport, kind_of_prose

    doc = analyze(_mlp(nn.ReLU()), input_size=(8,), batch_size=3, thresholds=(0.9,))
    kinds, sources = doc["source_kinds"], doc["sources"]
    assert set(kinds) - set(sources) == {f"{path}.{key}" for path in ("totals.train_memory", "totals.linear.train_memory")
                                         for key in doc["totals"]["train_memory"]["sources"]}
    for key, text in sources.items():  # the prose is unchanged; its first word agrees with the kind
        assert kinds.get(key, "") == kind_of_prose(text), key
    assert sources["totals.train_memory"] == "see train_memory.sources" and "totals.train_memory" not in kinds
    for path, memory in (("totals.train_memory", doc["totals"]["train_memory"]),
                         ("totals.linear.train_memory", doc["totals"]["linear"]["train_memory"])):
        for key, text in memory["sources"].items():
            assert kinds[f"{path}.{key}"] == kind_of_prose(text)
    assert kinds["totals.train_memory.saved_activation_bytes"] == "measured"
    assert kinds["totals.train_memory.total_bytes"] == "derived"
    assert AnalyzeReport.from_dict(doc).to_dict() == doc  # round trip
