"""Generic tests over the one list of test models (tests/models.py, TEST_MODELS), the timm/optimum way:
on every model, capture finds its linears; every pass does what it declares (preserves_computation,
reversible, marks); one real training step per method trains every trainable tensor; convert at half
the linear bytes restores bit for bit from its file; the ONNX export matches torch; and the fine-tuning
job trains the timm models it takes as they are. Entries flagged slow (and the ONNX and job tests) run
in `make test` only; the rest are part of `make test-fast`."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.convert import ConvertConfig, convert
from wasi_compress.marks import mark_of
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.modules.training import ASILinear, CompactInputLinear, WASILinear
from wasi_compress.passes.attention import ExplicitAttentionPass, ExplicitMultiheadAttention
from wasi_compress.passes.base import META_KEY
from wasi_compress.passes.capture import capture
from wasi_compress.passes.replace import ReplaceLinearsPass
from wasi_compress.passes.training import TrainingPass, to_inference

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


TEST_MODELS = _registry().TEST_MODELS


def _params(models=TEST_MODELS, *, slow_all: bool = False):
    return [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if (m.slow or slow_all) else []) for m in models]


ALL = _params()


@pytest.fixture
def on_path(monkeypatch):
    """MODEL strings such as vit_models:<factory> resolve (the tests folder on sys.path)."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _count(model: nn.Module, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def _full_rank(site, dense: nn.Linear) -> nn.Module:
    return SubspaceLinear.from_linear(dense, rank=min(site.in_features, site.out_features))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("tm", ALL)
def test_capture_finds_every_linear(tm):
    model, x = tm.factory(), tm.example()
    expected = _run(model, x)
    cap = capture(model, x)
    assert cap.method == tm.capture_method, cap.note
    assert not cap.skipped, cap.skipped
    names = [s.name for s in cap.sites]
    assert len(names) == tm.linears and len(set(names)) == len(names)
    # every nn.Linear of the (attention-rewritten) model is a site, with its sizes
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) <= set(names)
    for s in cap.sites:
        assert s.calls >= 1 and s.role
        if s.name in linears:
            assert (s.in_features, s.out_features) == (linears[s.name].in_features, linears[s.name].out_features)
    assert any(s.kind == "functional" for s in cap.sites) == tm.has_functional_linear
    assert _count(model, nn.MultiheadAttention) == 0
    assert (_count(model, ExplicitMultiheadAttention) > 0) == tm.has_mha
    torch.testing.assert_close(_run(model, x), expected, rtol=1e-4, atol=1e-5)  # the rewrite kept the function
    if tm.traceable:
        assert isinstance(cap.graph_module, fx.GraphModule)
        torch.testing.assert_close(_run(cap.graph_module, x), expected, rtol=1e-4, atol=1e-5)
    else:
        assert cap.graph_module is None and cap.note


# ---------------------------------------------------------------------------------------------------- passes


@pytest.mark.parametrize("tm", ALL)
def test_explicit_attention_pass_preserves_and_reverses(tm):
    model, x = tm.factory(), tm.example()
    expected, state = _run(model, x), _state(model)
    p = ExplicitAttentionPass()
    assert p.preserves_computation and p.reversible
    result = p(model)
    assert result.modified == tm.has_mha and result.graph_module is model
    assert _count(model, nn.MultiheadAttention) == 0
    assert (_count(model, ExplicitMultiheadAttention) > 0) == tm.has_mha
    torch.testing.assert_close(_run(model, x), expected, rtol=1e-4, atol=1e-5)
    assert p.reverse(model).modified == tm.has_mha
    assert _count(model, ExplicitMultiheadAttention) == 0
    torch.testing.assert_close(_run(model, x), expected, rtol=1e-4, atol=1e-5)
    _assert_same_state(_state(model), state, rtol=0, atol=0)  # the same tensors, under the same names


@pytest.mark.parametrize("tm", ALL)
def test_replace_linears_at_full_rank_preserves_marks_and_reverses(tm):
    model, x = tm.factory(), tm.example()
    expected = _run(model, x)
    cap = capture(model, x)
    target = cap.graph_module if tm.traceable else model
    state = _state(target)
    p = ReplaceLinearsPass(cap.sites, _full_rank, preserves_computation=True)
    assert p.reversible and p.preserves_computation
    result = p(target)
    assert result.modified and result.graph_module is target
    assert _count(target, nn.Linear) == 0
    assert _count(target, SubspaceLinear) == len(cap.sites)
    torch.testing.assert_close(_run(target, x), expected, rtol=1e-3, atol=1e-4)
    for s in cap.sites:
        if s.kind == "functional":  # the dense parameter is gone, not stored twice
            assert s.weight_name not in dict(target.named_parameters())
    if tm.traceable:
        marked = {n.meta[META_KEY]["replace_linears"]["site"] for n in target.graph.nodes
                  if "replace_linears" in n.meta.get(META_KEY, {})}
        assert marked == {s.name for s in cap.sites}
    p.reverse(target)
    assert _count(target, SubspaceLinear) == 0
    torch.testing.assert_close(_run(target, x), expected, rtol=1e-3, atol=1e-4)
    _assert_same_state(_state(target), state, rtol=1e-4, atol=1e-5)  # W = L R at full rank


def test_replace_linears_refuses_a_functional_site_without_the_graph():
    tm = _registry().BY_NAME["functional_head_vit"]
    model, x = tm.factory(), tm.example()
    cap = capture(model, x)
    with pytest.raises(TypeError, match="functional linear; pass the captured GraphModule"):
        ReplaceLinearsPass(cap.sites, _full_rank)(model)


# ---------------------------------------------------------------------------------------------------- training

METHODS = [("wasi", "factored"), ("wasi", "subspace-iteration"), ("asi", None), ("vanilla", None)]
TRAINING_MODULES = (WASILinear, ASILinear, CompactInputLinear)


@pytest.mark.parametrize("method,update", METHODS, ids=[f"{m}-{u}" if u else m for m, u in METHODS])
@pytest.mark.parametrize("tm", _params([m for m in TEST_MODELS if m.train_step]))
def test_one_training_step_per_method_trains_every_trainable_tensor(tm, method, update):
    model, x = tm.factory(), tm.example(8)
    out = _run(model, x)
    y = torch.randint(0, out.shape[-1], (x.shape[0],), generator=torch.Generator().manual_seed(1))
    cap = capture(model, x)
    kwargs = {"update": update} if update else {}
    if update == "subspace-iteration":
        kwargs["lr"] = 0.01
    p = TrainingPass(cap, method=method, threshold=0.5, activation_threshold=0.9, **kwargs)
    assert p.preserves_computation == (method == "vanilla")
    model = p(model).graph_module
    in_blocks = any(s.block is not None for s in cap.sites)  # attention or MLP found in the graph (or names)
    kinds = {type(m) for m in model.modules()}
    assert bool(kinds & {WASILinear, ASILinear}) == (method != "vanilla" and in_blocks)
    if method == "wasi" and in_blocks:
        assert WASILinear in kinds
    for name, m in model.named_modules():  # every module the pass made says so, and for which site
        if isinstance(m, TRAINING_MODULES):
            mark = mark_of(m, p.name)
            assert mark is not None and mark["site"] == name, (name, mark)

    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    before = {**_state(model)}
    lr = 0.01
    opt = torch.optim.SGD(params.values(), lr=lr)
    must_move = set()
    losses = []
    for step in range(4):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            for n, q in params.items():
                assert q.grad is not None, f"{n} got no gradient"
                assert torch.isfinite(q.grad).all(), f"{n}: non-finite gradient"
                # a step float32 can show (LayerScale's 1e-6 gammas make some norm updates vanish)
                if (lr * q.grad).abs().max() > 1e-5 * max(1.0, float(q.detach().abs().max())):
                    must_move.add(n)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert must_move and must_move <= changed, must_move - changed
    assert all(torch.isfinite(after[k]).all() for k in changed)
    for name, m in model.named_modules():  # subspace iteration updates its factors (buffers) inside backward
        if isinstance(m, WASILinear) and update == "subspace-iteration":
            assert {f"{name}.L", f"{name}.R"} <= changed, name

    with torch.no_grad():
        trained = model.eval()(x)
    model = p.reverse(model).graph_module if p.reversible else to_inference(model)  # the inference form
    assert not any(isinstance(m, TRAINING_MODULES) for m in model.modules())
    torch.testing.assert_close(_run(model, x), trained, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- convert


def _half_linear_budget(tm, model: nn.Module) -> int:
    """The model's float32 bytes with its linear layers at half their bytes."""
    cap = capture(copy.deepcopy(model), tm.example())
    linear = sum(4 * (s.in_features * s.out_features + (s.out_features if s.bias else 0)) for s in cap.sites)
    total = 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return total - linear // 2


LOADABLE = _params([m for m in TEST_MODELS if m.loadable])


@pytest.mark.parametrize("tm", LOADABLE)
def test_convert_at_half_the_linear_bytes_restores_identically(tm, on_path, tmp_path):
    from wasi_compress.loading import load_model

    loaded = load_model(tm.model)
    original = _state(loaded.model)
    budget = _half_linear_budget(tm, loaded.model)
    out = tmp_path / "half.safetensors"
    result = convert(loaded, ConvertConfig(budget=budget, output=str(out)))
    _assert_same_state(_state(loaded.model), original, rtol=0, atol=0)  # convert works on a copy
    doc = result.report
    assert doc["total_bytes"] <= budget < doc["original_bytes"]
    assert any(layer["rank"] is not None for layer in doc["layers"])
    assert result.files == [str(out)] and out.exists()
    restored = wasi_compress.load(out, trust_code=True)  # the test's own factory
    assert _count(restored, SubspaceLinear) == sum(layer["rank"] is not None for layer in doc["layers"])
    x = tm.example(3, seed=5)
    torch.testing.assert_close(_run(restored, x), _run(result.model, x), rtol=0, atol=0)
    _assert_same_state(_state(restored), _state(result.model), rtol=0, atol=0)


@pytest.mark.parametrize("tm", _params([m for m in TEST_MODELS if m.onnx and m.loadable], slow_all=True))
def test_onnx_export_matches_torch(tm, on_path, tmp_path):
    import onnxruntime as ort

    from wasi_compress.loading import load_model

    loaded = load_model(tm.model)
    onnx_path = tmp_path / "half.onnx"
    result = convert(loaded, ConvertConfig(budget=_half_linear_budget(tm, loaded.model), onnx=str(onnx_path)))
    assert result.report["onnx"]["max_abs_diff"] <= 1e-4
    x = tm.example(2, seed=7)
    session = ort.InferenceSession(str(onnx_path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _run(result.model, x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- the job


@pytest.mark.slow  # one epoch of the fine-tuning job
@pytest.mark.parametrize("tm", [pytest.param(m, id=m.name) for m in TEST_MODELS if m.trainable_timm])
def test_finetune_job_trains_and_its_checkpoint_restores(tm, on_path, tmp_path):
    from wasi_compress.finetune import FinetuneConfig, finetune

    out = tmp_path / "ft.safetensors"
    result = finetune(FinetuneConfig(model=tm.model, data="digits", method="wasi", update="factored", optimizer="adamw",
                                     lr=1e-3, epochs=1, measure_memory=False, output=str(out)))
    epoch = result.doc["epochs"][0]
    assert math.isfinite(epoch["loss"]) and epoch["accuracy"] > 0.2, epoch  # ten classes: chance is 0.1
    restored = wasi_compress.load(out, trust_code=True)  # the test's own factory
    assert _count(restored, SubspaceLinear) > 0
    x = tm.example(4, seed=3)
    torch.testing.assert_close(_run(restored, x), _run(result.model, x), rtol=1e-5, atol=1e-6)
