"""Capture: the fx trace equals the eager model (timm families and hand-written ViTs), shapes land in
node.meta, every linear is found with its qualified name and role, nn.MultiheadAttention is made
explicit, and when fx cannot trace, forward hooks take over and the result says so. Nothing is skipped
silently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from wasi_compress.passes.capture import capture, register_linear_type, role_of, trace

# (timm name, small-size kwargs, linears expected): the timm entries of the one list of test models
# (tests/models.py); depth 2 where timm allows it, Swin at window x patch x 2 for two stages.
def _registry():
    import importlib.util
    import sys
    from pathlib import Path

    name = "wasi_compress_test_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TIMM_MODELS = [(m.model.partition(":")[2], m.timm_kwargs, m.linears) for m in _registry().TIMM_MODELS]
# base widths (768) cost a third of a second each: in the full suite only
TIMM_PARAMS = [pytest.param(*m, id=m[0], marks=[pytest.mark.slow] if "_base_" in m[0] else []) for m in TIMM_MODELS]


def _linear_module_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _eager_linear_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Input shapes of every nn.Linear on a plain eager forward, for comparison."""
    shapes, handles = {}, []

    def hook(_m, args, _out, name):
        shapes.setdefault(name, tuple(args[0].shape))  # returns None: the output is left alone

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _check_complete(cap, model: nn.Module) -> None:
    """Every nn.Linear of the model is a site (a module site, or a functional site named after it), and
    every site has a role, sizes and shapes."""
    assert not cap.skipped, cap.skipped
    names = [s.name for s in cap.sites]
    assert len(names) == len(set(names))
    assert _linear_module_names(model) <= set(names)
    for site in cap.sites:
        assert site.role in {"qkv", "q", "k", "v", "proj", "fc1", "fc2", "head", "other"}
        assert site.input_shape is not None and site.input_shape[-1] == site.in_features
        assert site.output_shape is not None and site.output_shape[-1] == site.out_features
        assert site.calls >= 1
        w = model.get_parameter(site.weight_name)
        assert tuple(w.shape) == (site.out_features, site.in_features)


# --------------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize("name,kwargs,n_linears", TIMM_PARAMS)
def test_timm_trace_equals_eager(name, kwargs, n_linears):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        expected = model(x)
    cap = capture(model, x)
    assert cap.method == "fx" and cap.note is None
    assert isinstance(cap.graph_module, fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(x), expected, rtol=1e-5, atol=1e-5)
    assert len(cap.sites) == n_linears
    _check_complete(cap, model)
    eager = _eager_linear_shapes(model, x)
    for site in cap.sites:
        if site.kind == "module":
            assert site.input_shape == eager[site.name]
    roles = [s.role for s in cap.sites]
    blocks = roles.count("qkv")
    assert blocks >= 2 and roles.count("proj") >= blocks and roles.count("fc1") == roles.count("fc2") == blocks
    assert "head" in roles and "other" not in [s.role for s in cap.sites if ".attn." in s.name or ".mlp." in s.name]


def test_timm_sites_are_in_execution_order_with_qualified_names():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    cap = capture(model, torch.randn(1, 3, 32, 32))
    assert [(s.name, s.role) for s in cap.sites] == [
        ("blocks.0.attn.qkv", "qkv"), ("blocks.0.attn.proj", "proj"), ("blocks.0.mlp.fc1", "fc1"), ("blocks.0.mlp.fc2", "fc2"),
        ("blocks.1.attn.qkv", "qkv"), ("blocks.1.attn.proj", "proj"), ("blocks.1.mlp.fc1", "fc1"), ("blocks.1.mlp.fc2", "fc2"),
        ("head", "head"),
    ]
    assert cap.sites[0].input_shape == (1, 5, 192) and cap.sites[0].output_shape == (1, 5, 576)
    assert cap.sites[-1].input_shape == (1, 192)


def test_beit_qkv_is_a_functional_site_with_a_computed_bias():
    import timm

    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, depth=1).eval()
    cap = capture(model, torch.randn(1, 3, 32, 32))
    qkv = next(s for s in cap.sites if s.name == "blocks.0.attn.qkv")
    assert qkv.kind == "functional" and qkv.role == "qkv"
    assert qkv.weight_name == "blocks.0.attn.qkv.weight"
    assert qkv.bias and qkv.bias_name is None  # q_bias / v_bias are concatenated in forward
    assert [s.name for s in cap.sites].count("blocks.0.attn.qkv") == 1


def test_shapes_are_recorded_in_node_meta():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = capture(model, x)
    nodes = {n.name: n for n in cap.graph_module.graph.nodes}
    for site in cap.sites:
        meta = nodes[site.node].meta["tensor_meta"]
        assert tuple(meta.shape) == site.output_shape
        assert meta.dtype == torch.float32
    output = next(n for n in cap.graph_module.graph.nodes if n.op == "output")
    assert tuple(output.args[0].meta["tensor_meta"].shape) == (2, 1000)
    # every node that computes a tensor carries its shape
    for node in cap.graph_module.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method") and node.meta.get("type") is torch.Tensor:
            assert "tensor_meta" in node.meta, node.name


# --------------------------------------------------------------------------------------------------
# hand-written ViTs (tests/vit_models.py)


@pytest.mark.parametrize("factory", ["functional_head_vit", "mha_vit"])
def test_hand_written_vit_trace_equals_eager(vit_models, factory):
    model = getattr(vit_models, factory)().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    cap = capture(model, x)
    assert cap.method == "fx" and cap.note is None
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)  # the rewritten model too
    assert len(cap.sites) == vit_models.EXPECTED_LINEARS[factory]
    _check_complete(cap, model)


def test_functional_head_is_found(vit_models):
    model = vit_models.functional_head_vit(num_classes=7)
    cap = capture(model, torch.randn(2, 3, 32, 32))
    head = cap.sites[-1]
    assert (head.name, head.kind, head.role) == ("head_weight", "functional", "head")
    assert (head.in_features, head.out_features) == (vit_models.DIM, 7)
    assert (head.weight_name, head.bias_name, head.bias) == ("head_weight", "head_bias", True)
    assert head.input_shape == (2, vit_models.DIM) and head.output_shape == (2, 7)
    assert cap.graph_module.graph.find_nodes(op="call_function", target=F.linear)[0].name == head.node
    assert [s.role for s in cap.sites[:4]] == ["qkv", "proj", "fc1", "fc2"]


def test_multihead_attention_is_rewritten_into_explicit_projections(vit_models):
    from wasi_compress.passes.attention import ExplicitMultiheadAttention

    model = vit_models.mha_vit().eval()
    cap = capture(model, torch.randn(2, 3, 32, 32))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert isinstance(model.blocks[0].attn, ExplicitMultiheadAttention)
    assert [(s.name, s.role) for s in cap.sites[:6]] == [
        ("blocks.0.attn.q_proj", "q"), ("blocks.0.attn.k_proj", "k"), ("blocks.0.attn.v_proj", "v"),
        ("blocks.0.attn.out_proj", "proj"), ("blocks.0.mlp.fc1", "fc1"), ("blocks.0.mlp.fc2", "fc2"),
    ]


def test_multihead_attention_without_rewrite_is_skipped_with_a_reason(vit_models):
    model = vit_models.mha_vit().eval()
    cap = capture(model, torch.randn(1, 3, 32, 32), rewrite_attention=False)
    skipped = {s["name"]: s["reason"] for s in cap.skipped}
    assert set(skipped) == {"blocks.0.attn", "blocks.1.attn"}
    assert all("MultiheadAttention" in r for r in skipped.values())
    assert not any(".attn." in s.name for s in cap.sites)


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_attention_matches_multihead_attention(batch_first):
    from wasi_compress.passes.attention import ExplicitAttentionPass

    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10)
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    k = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
    v = torch.randn(2, 7, 10) if batch_first else torch.randn(7, 2, 10)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, -2:] = True
    holder.eval()
    with torch.no_grad():
        ref_out, ref_w = holder.attn(q, k, v, key_padding_mask=mask)
        ExplicitAttentionPass()(holder)
        out, w = holder.attn(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    ExplicitAttentionPass().reverse(holder)
    assert type(holder.attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(holder.attn(q, k, v, key_padding_mask=mask)[0], ref_out, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# fallback to forward hooks


def test_untraceable_model_falls_back_to_hooks_and_says_why(vit_models):
    model = vit_models.untraceable_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(Exception):
        trace(model)
    cap = capture(model, x)
    assert cap.method == "hooks" and cap.graph_module is None
    assert "fx could not trace UntraceableViT" in cap.note and "TraceError" in cap.note
    assert len(cap.sites) == vit_models.EXPECTED_LINEARS["untraceable_vit"]
    _check_complete(cap, model)
    assert [s.name for s in cap.sites][:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert cap.sites[-1].name == "head" and cap.sites[-1].input_shape == (2, vit_models.DIM)
    assert all(s.kind == "module" for s in cap.sites)


def test_hooks_fallback_lists_functional_linears_as_skipped(vit_models):
    """fx cannot trace it and its head is F.linear: hooks cannot capture that head, and it must not
    vanish silently."""

    class UntraceableFunctionalHead(vit_models.FunctionalHeadViT):
        def forward(self, x):
            if x.sum() > 0:
                x = x * 1.0
            return F.linear(self.features(x), self.head_weight, self.head_bias)

    model = UntraceableFunctionalHead(num_classes=10, img_size=32).eval()
    cap = capture(model, torch.randn(2, 3, 32, 32))
    assert cap.method == "hooks"
    assert len(cap.sites) == 8
    assert [s["name"] for s in cap.skipped] == ["head_weight"]
    assert "F.linear" in cap.skipped[0]["reason"]


def test_graph_that_fails_on_the_example_falls_back_to_hooks():
    class TracesButGraphFails(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if not isinstance(x, torch.Tensor):  # only while tracing: records a call that cannot run
                x = x.no_such_method()
            return self.fc(x)

    model = TracesButGraphFails()
    cap = capture(model, torch.randn(2, 4))
    assert cap.method == "hooks"
    assert "graph failed on the example input" in cap.note and "no_such_method" in cap.note
    assert [(s.name, s.input_shape, s.calls) for s in cap.sites] == [("fc", (2, 4), 1)]


def test_wrong_input_raises_the_models_own_error_without_printing(capfd):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(AssertionError, match=r"Input height \(64\) doesn't match model \(32\)"):
        capture(model, torch.randn(1, 3, 64, 64))
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "ShapeProp" not in err


# --------------------------------------------------------------------------------------------------
# nothing skipped silently, shared and registered linears


def test_unused_linear_and_functional_linear_on_a_computed_weight_are_skipped_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(self.fc1(x), self.w * 2.0)

    cap = capture(Odd(), torch.randn(2, 4))
    assert [s.name for s in cap.sites] == ["fc1"]
    reasons = {s["name"]: s["reason"] for s in cap.skipped}
    assert reasons["unused"] == "not called by forward on the example input"
    assert any("computed weight" in r for r in reasons.values())
    assert len(reasons) == 2


def test_a_linear_called_twice_is_one_site_with_two_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            x = self.fc(self.fc(x))
            return F.linear(F.linear(x, self.w), self.w)

    cap = capture(Twice(), torch.randn(2, 4))
    assert [(s.name, s.kind, s.calls) for s in cap.sites] == [("fc", "module", 2), ("w", "functional", 2)]


def test_registered_linear_type_is_a_leaf_and_a_site():
    from wasi_compress.passes import capture as capture_module

    class LowRank(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 6, 5
            self.L = nn.Parameter(torch.randn(5, 2))
            self.R = nn.Parameter(torch.randn(2, 6))
            self.bias = None

        def forward(self, x):
            return F.linear(F.linear(x, self.R), self.L)

    register_linear_type(LowRank, "L")
    try:
        model = nn.Sequential(LowRank(), nn.ReLU())
        cap = capture(model, torch.randn(3, 6))
        assert [(s.name, s.kind, s.in_features, s.out_features, s.weight_name) for s in cap.sites] == [("0", "module", 6, 5, "0.L")]
        assert [n.op for n in cap.graph_module.graph.nodes if n.name == cap.sites[0].node] == ["call_module"]
    finally:
        capture_module._LINEAR_TYPES.pop(LowRank)


def test_capture_restores_training_mode(vit_models):
    model = vit_models.functional_head_vit().train()
    capture(model, torch.randn(1, 3, 32, 32))
    assert model.training


@pytest.mark.parametrize("name,role", [
    ("blocks.3.attn.qkv", "qkv"), ("layers.0.blocks.1.attn.qkv", "qkv"), ("blocks.0.attn.proj", "proj"),
    ("blocks.0.mlp.fc1", "fc1"), ("blocks.0.mlp.fc2", "fc2"), ("head", "head"), ("head.fc", "head"),
    ("head_dist", "head"), ("head_weight", "head"), ("fc", "head"), ("classifier", "head"),
    ("encoder.layer.0.attention.self.query", "q"), ("encoder.layer.0.attention.self.key", "k"),
    ("encoder.layer.0.attention.self.value", "v"), ("encoder.layer.0.attention.output.dense", "proj"),
    ("encoder.layer.0.intermediate.dense", "fc1"), ("encoder.layer.0.output.dense", "fc2"),
    ("blocks.0.attn.q_proj", "q"), ("blocks.0.attn.k_proj", "k"), ("blocks.0.attn.v_proj", "v"),
    ("blocks.0.attn.out_proj", "proj"), ("layers.0.downsample.reduction", "other"), ("blocks.2.attn.qk", "qkv"),
])
def test_roles_from_names(name, role):
    assert role_of(name) == role
