"""Every pass on several models: computation preserved (at full rank), reverse restores the dense model,
and touched fx nodes are marked in node.meta['wasi_compress']."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.passes.attention import ExplicitAttentionPass, ExplicitMultiheadAttention
from wasi_compress.passes.base import META_KEY
from wasi_compress.passes.capture import capture
from wasi_compress.passes.replace import ReplaceLinearsPass

torch.set_num_threads(1)


class HandViT(nn.Module):
    """A hand-written ViT: nn.MultiheadAttention blocks and a functional head on raw parameters."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 7, img: int = 16, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head_weight = nn.Parameter(torch.randn(classes, dim) * dim ** -0.5)
        self.head_bias = nn.Parameter(torch.randn(classes) * 0.1)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for n1, attn, n2, mlp in zip(self.norms1, self.attns, self.norms2, self.mlps):
            h = n1(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + mlp(n2(x))
        return F.linear(self.norm(x)[:, 0], self.head_weight, self.head_bias)


def _vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=5)


def _swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4, depths=(1, 1),
                             num_heads=(1, 2), embed_dim=16, patch_size=4, num_classes=5)


MODELS = {
    "timm-vit": (_vit, (2, 3, 32, 32)),
    "timm-swin": (_swin, (2, 3, 32, 32)),
    "hand-vit": (HandViT, (2, 3, 16, 16)),
}


def _model(name):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    return model, torch.randn(*shape)


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) and type(m) is cls for m in model.modules())


def _full_rank(site, dense: nn.Linear) -> nn.Module:
    return SubspaceLinear.from_linear(dense, rank=min(site.in_features, site.out_features))


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_pass_preserves_and_reverses(name):
    model, x = _model(name)
    with torch.no_grad():
        expected = model(x)
    n_mha = _count(model, nn.MultiheadAttention)
    p = ExplicitAttentionPass()
    result = p(model)
    assert result.modified == (n_mha > 0)
    assert _count(model, nn.MultiheadAttention) == 0
    assert sum(isinstance(m, ExplicitMultiheadAttention) for m in model.modules()) == n_mha
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    p.reverse(model)
    assert _count(model, nn.MultiheadAttention) == n_mha
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_replace_at_full_rank_on_graph_preserves_marks_and_reverses(name):
    model, x = _model(name)
    with torch.no_grad():
        expected = model(x)
    cap = capture(model, x)  # rewrites attention so its projections are sites
    gm = cap.graph_module
    assert cap.method == "fx" and gm is not None
    functional = [s for s in cap.sites if s.kind == "functional"]
    assert (name == "hand-vit") == bool(functional)
    linears_before = _count(gm, nn.Linear)
    params_before = {k for k, _ in gm.named_parameters()}

    p = ReplaceLinearsPass(cap.sites, _full_rank, preserves_computation=True)
    assert p(gm).modified
    assert _count(gm, nn.Linear) == 0
    assert sum(isinstance(m, SubspaceLinear) for m in gm.modules()) == len(cap.sites)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-3, atol=1e-4)
    marked = {n.meta[META_KEY]["replace_linears"]["site"] for n in gm.graph.nodes
              if "replace_linears" in n.meta.get(META_KEY, {})}
    assert marked == {s.name for s in cap.sites}
    for site in functional:  # the dense parameter is gone, not stored twice
        assert site.weight_name not in {k for k, _ in gm.named_parameters()}

    p.reverse(gm)
    assert _count(gm, nn.Linear) == linears_before
    assert not any(isinstance(m, SubspaceLinear) for m in gm.modules())
    assert {k for k, _ in gm.named_parameters()} == params_before
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["timm-vit", "timm-swin"])
def test_replace_module_sites_keeps_the_model_class(name):
    model, x = _model(name)
    cls = type(model)
    with torch.no_grad():
        expected = model(x)
    cap = capture(model, x)
    n = _count(model, nn.Linear)
    p = ReplaceLinearsPass(cap.sites, _full_rank, preserves_computation=True)
    p(model)
    assert type(model) is cls and _count(model, nn.Linear) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-3, atol=1e-4)
    p.reverse(model)
    assert _count(model, nn.Linear) == n
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-3, atol=1e-4)


def test_lower_rank_changes_outputs_and_reverse_gives_the_factored_weight():
    model, x = _model("hand-vit")
    cap = capture(model, x)
    gm = cap.graph_module
    p = ReplaceLinearsPass(cap.sites, lambda site, dense: SubspaceLinear.from_linear(dense, rank=1))
    p(gm)
    factored = {s.name: (gm.get_submodule(r.module_name).L @ gm.get_submodule(r.module_name).R).detach()
                for s, r in zip(cap.sites, p.replaced)}
    with torch.no_grad():
        low = gm(x)
    p.reverse(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), low, rtol=1e-3, atol=1e-4)  # dense W = L R, same function
    site = next(s for s in cap.sites if s.kind == "functional")
    torch.testing.assert_close(gm.get_parameter(site.weight_name).detach(), factored[site.name])
    assert isinstance(gm, fx.GraphModule)


def test_passes_do_not_touch_a_copy():
    model, x = _model("timm-vit")
    original = copy.deepcopy(model)
    cap = capture(model, x)
    ReplaceLinearsPass(cap.sites, _full_rank)(model)
    assert _count(original, nn.Linear) == len(cap.sites)
