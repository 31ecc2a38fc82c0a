"""What the passes claim, checked so that a pass that broke its claim would fail: ``preserves_computation``
and ``reversible`` as declared, the marks in node.meta['wasi_compress'] naming each site and the module
that replaced it, in-place work on the module given and on nothing else (the tensors of the replaced
linears are left as they were), and a reverse that gives back the factored weight at a lower rank.
Full-rank preservation and reversal on every test model are in test_generic.py."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.passes.attention import ExplicitAttentionPass, ExplicitMultiheadAttention
from wasi_compress.passes.base import META_KEY, PassResult, WasiPass
from wasi_compress.passes.capture import capture
from wasi_compress.passes.replace import ReplaceLinearsPass
from wasi_compress.passes.training import TrainingPass

torch.set_num_threads(1)
TESTS_DIR = Path(__file__).resolve().parent


def _registry():
    name = "wasi_compress_test_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS_DIR / "models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _model(name):
    tm = _registry().BY_NAME[name]
    return tm.factory(), tm.example()


def _run(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _count(model: nn.Module, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def _full_rank(site, dense: nn.Linear) -> nn.Module:
    return SubspaceLinear.from_linear(dense, rank=min(site.in_features, site.out_features))


def _rank1(site, dense: nn.Linear) -> nn.Module:
    return SubspaceLinear.from_linear(dense, rank=1)


def test_declared_properties():
    model, x = _model("hand_vit")
    cap = capture(model, x)
    assert ExplicitAttentionPass.preserves_computation and ExplicitAttentionPass.reversible
    assert ReplaceLinearsPass(cap.sites, _full_rank, preserves_computation=True).preserves_computation
    low = ReplaceLinearsPass(cap.sites, _rank1)
    assert low.reversible and not low.preserves_computation  # the default: a builder at a rank changes outputs
    training = TrainingPass(cap, method="asi")
    # its reverse is to_inference: ASI layers back to nn.Linear, WASI layers to their SubspaceLinear
    assert training.reversible and not training.preserves_computation
    assert TrainingPass(cap, method="vanilla").preserves_computation
    x_out = _run(model, x)
    trained = training(model).graph_module
    assert any(type(m).__name__ == "ASILinear" for m in trained.modules())
    reversed_model = training.reverse(trained).graph_module
    assert not any(type(m).__name__ in ("ASILinear", "CompactInputLinear") for m in reversed_model.modules())
    torch.testing.assert_close(_run(reversed_model, x), x_out, rtol=0, atol=0)  # ASI keeps the dense weights


def test_a_pass_that_is_not_reversible_refuses_to_reverse():
    class Scale(WasiPass):
        name = "scale"

        def call(self, module):
            with torch.no_grad():
                for q in module.parameters():
                    q.mul_(2)
            return PassResult(module, True)

    model = nn.Linear(3, 2)
    p = Scale()
    assert not p.reversible and not p.preserves_computation  # the base class claims nothing
    assert p(model).modified
    with pytest.raises(TypeError, match="'scale' is not reversible"):
        p.reverse(model)


def test_a_pass_declared_not_preserving_does_change_the_outputs():
    """rank 1 everywhere: if the outputs stayed equal, the pass would not have replaced anything."""
    model, x = _model("hand_vit")
    expected = _run(model, x)
    cap = capture(model, x)
    ReplaceLinearsPass(cap.sites, _rank1)(cap.graph_module)
    assert (_run(cap.graph_module, x) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["hand_vit", "functional_head_vit"])
def test_marks_name_every_site_and_its_module(name):
    model, x = _model(name)
    cap = capture(model, x)
    gm = cap.graph_module
    unmarked_before = [n for n in gm.graph.nodes if "replace_linears" in n.meta.get(META_KEY, {})]
    assert unmarked_before == []
    ReplaceLinearsPass(cap.sites, _full_rank)(gm)
    marks = {}
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY, {}).get("replace_linears")
        if info is not None:
            assert node.op == "call_module" and type(gm.get_submodule(node.target)) is SubspaceLinear
            marks[info["site"]] = info
    assert set(marks) == {s.name for s in cap.sites}
    assert {m["module"] for m in marks.values()} == {"SubspaceLinear"}
    functional = {s.name for s in cap.sites if s.kind == "functional"}
    assert functional and {n for n, m in marks.items() if m.get("functional")} == functional


def test_replace_works_in_place_on_the_module_given_and_leaves_the_replaced_tensors_alone():
    """The pass swaps modules in the model it is given (the same object comes back) and never writes
    into the tensors it read: the nn.Linear objects it took out hold their weights unchanged, and an
    independent copy taken before keeps its linears and computes what the model computed."""
    model, x = _model("tiny_swin")
    expected = _run(model, x)
    cap = capture(model, x)
    copy_before = copy.deepcopy(model)
    removed = {s.name: model.get_submodule(s.name) for s in cap.sites}
    weights = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
               for n, m in removed.items()}
    result = ReplaceLinearsPass(cap.sites, _rank1)(model)
    assert result.graph_module is model and result.modified
    assert all(type(model.get_submodule(n)) is SubspaceLinear for n in removed)  # changed in place
    for n, m in removed.items():
        w, b = weights[n]
        assert torch.equal(m.weight, w), n
        assert b is None or torch.equal(m.bias, b), n
    assert all(type(copy_before.get_submodule(n)) is nn.Linear for n in removed)
    torch.testing.assert_close(_run(copy_before, x), expected, rtol=0, atol=0)
    assert not torch.allclose(_run(model, x), expected, atol=1e-3)  # ...while the model itself changed


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_swin"])
def test_replace_module_sites_keeps_the_model_class(name):
    model, x = _model(name)
    cls = type(model)
    expected = _run(model, x)
    cap = capture(model, x)
    n = _count(model, nn.Linear)
    p = ReplaceLinearsPass(cap.sites, _full_rank, preserves_computation=True)
    p(model)
    assert type(model) is cls and _count(model, nn.Linear) == 0
    torch.testing.assert_close(_run(model, x), expected, rtol=1e-3, atol=1e-4)
    p.reverse(model)
    assert type(model) is cls and _count(model, nn.Linear) == n
    torch.testing.assert_close(_run(model, x), expected, rtol=1e-3, atol=1e-4)


def test_lower_rank_changes_outputs_and_reverse_gives_the_factored_weight():
    model, x = _model("hand_vit")
    cap = capture(model, x)
    gm = cap.graph_module
    p = ReplaceLinearsPass(cap.sites, _rank1)
    p(gm)
    factored = {s.name: (gm.get_submodule(r.module_name).L @ gm.get_submodule(r.module_name).R).detach()
                for s, r in zip(cap.sites, p.replaced)}
    low = _run(gm, x)
    p.reverse(gm)
    torch.testing.assert_close(_run(gm, x), low, rtol=1e-3, atol=1e-4)  # dense W = L R, same function
    site = next(s for s in cap.sites if s.kind == "functional")
    torch.testing.assert_close(gm.get_parameter(site.weight_name).detach(), factored[site.name])
    assert isinstance(gm, fx.GraphModule)


def test_explicit_attention_reverse_gives_back_multihead_attention_with_the_same_tensors():
    model, x = _model("mha_vit")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = _count(model, nn.MultiheadAttention)
    assert n == 2
    p = ExplicitAttentionPass()
    p(model)
    assert _count(model, ExplicitMultiheadAttention) == n and _count(model, nn.MultiheadAttention) == 0
    assert not p(model).modified  # nothing left to rewrite: a second run reports no change
    p.reverse(model)
    assert _count(model, nn.MultiheadAttention) == n
    got = model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
