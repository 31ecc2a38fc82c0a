"""The Python API for a model of one's own (wasi_compress.transforms): the examples' own-loop training
through public names only, the handle's one call, configs, filters, the registry, save and load."""

from __future__ import annotations

import ast
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import wasi_compress
from wasi_compress import LowRankConfig, WasiConfig, apply_, lowrank_, prepare_training_, save, to_inference_
from wasi_compress.errors import UserError
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.modules.training import ASILinear, WASILinear

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_own_loop", "train_own_optimizer"])
def test_examples_train_in_their_own_loop_through_the_public_api(name, tmp_path):
    for imported in [i for i in _imports(EXAMPLES / f"{name}.py") if not i.startswith("__future__")]:
        assert not any(part.startswith("_") for part in imported.split(".")), imported
        if imported.startswith("wasi_compress."):
            assert imported.split(".")[1] in wasi_compress.__all__, imported  # top-level public names only
    example = _example(name)
    train, test = example.digits()
    before = example.accuracy(wasi_compress.load("builtin:mnist-vit"), test)
    result = example.main(epochs=1, out=str(tmp_path / "m.safetensors"))
    assert result["accuracy"] > max(before + 0.2, 0.75), (before, result["accuracy"])
    wasi = [layer for layer in result["layers"] if layer.module == "wasi"]
    assert wasi and all(layer.weight_rank < min(192, 768) for layer in wasi)
    reloaded = wasi_compress.load(tmp_path / "m.safetensors")
    assert example.accuracy(reloaded, test) == pytest.approx(result["accuracy"])
    assert sum(isinstance(m, SubspaceLinear) for m in reloaded.modules()) == len(wasi)


def _tiny(vit_models):
    torch.manual_seed(0)
    return vit_models.tiny_timm_vit()


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model, optimizer, steps=3, after=None):
    x, y = _batch()
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after:
            after()


def test_attach_does_the_per_step_bookkeeping(vit_models):
    """attach(optimizer) gives the same weights as calling after_step() by hand after every step."""
    weights = []
    for attached in (True, False):
        model = _tiny(vit_models)
        handle = prepare_training_(model, WasiConfig(threshold=0.6), example=_batch()[0][:2])
        optimizer = torch.optim.SGD([p for p in handle.model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        if attached:
            handle.attach(optimizer)
        _train(handle.model, optimizer, after=None if attached else handle.after_step)
        weights.append({k: v.clone() for k, v in handle.model.state_dict().items()})
        layer = next(m for m in handle.model.modules() if isinstance(m, WASILinear))
        eye = torch.eye(layer.rank)
        torch.testing.assert_close(layer.L.t() @ layer.L, eye, atol=1e-5, rtol=0)  # L stays orthonormal
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_subspace_iteration_layers_follow_the_optimizer_learning_rate(vit_models):
    model = _tiny(vit_models)
    handle = prepare_training_(model, WasiConfig(update="subspace-iteration", lr=0.5), example=_batch()[0][:2])
    optimizer = torch.optim.SGD([p for p in handle.model.parameters() if p.requires_grad], lr=0.02, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    handle.attach(optimizer)
    layers = [m for m in handle.model.modules() if isinstance(m, WASILinear)]
    x, y = _batch()
    for expected in (0.02, 0.01):
        F.cross_entropy(handle.model(x), y).backward()
        assert {m.lr for m in layers} == {expected} and {m.weight_decay for m in layers} == {0.01}
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def test_filter_fn_decides_which_linears_change(vit_models):
    model = _tiny(vit_models)
    handle = prepare_training_(model, WasiConfig(method="asi"), example=_batch()[0][:2],
                               filter_fn=lambda module, fqn: fqn.endswith("fc2"))
    changed = {name for name, m in handle.model.named_modules() if isinstance(m, ASILinear)}
    assert changed == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}


def test_to_inference_keeps_the_function_and_dense_reverses(vit_models):
    model = _tiny(vit_models)
    handle = prepare_training_(model, WasiConfig(threshold=0.7), example=_batch()[0][:2])
    optimizer = handle.attach(torch.optim.SGD([p for p in handle.model.parameters() if p.requires_grad], lr=0.05))
    _train(handle.model, optimizer)
    x = _batch()[0]
    expected = handle.model.eval()(x)
    trained = copy.deepcopy(handle.model)
    to_inference_(handle.model)
    assert not any(isinstance(m, (WASILinear, ASILinear)) for m in handle.model.modules())
    torch.testing.assert_close(handle.model(x), expected, atol=1e-5, rtol=1e-5)
    dense = to_inference_(trained, dense=True)
    assert not any(isinstance(m, SubspaceLinear) for m in dense.modules())
    torch.testing.assert_close(dense(x), expected, atol=1e-4, rtol=1e-4)


def test_lowrank_changes_the_model_in_place_and_saves(vit_models, tmp_path):
    model = _tiny(vit_models)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    plan = lowrank_(model, LowRankConfig(budget=int(dense_bytes * 0.7)), example=_batch()[0][:2])
    assert plan.model is model and plan.total_bytes <= int(dense_bytes * 0.7)
    assert any(isinstance(m, SubspaceLinear) for m in model.modules())
    x = _batch()[0]
    path = save(model, tmp_path / "m.safetensors", arch="vit_models:tiny_timm_vit")
    torch.testing.assert_close(wasi_compress.load(path, trust_code=True)(x), model(x), rtol=0, atol=0)


def test_apply_dispatches_on_the_config_type(vit_models):
    model = _tiny(vit_models)
    handle = apply_(model, WasiConfig(method="asi"), example=_batch()[0][:2])
    assert any(isinstance(m, ASILinear) for m in handle.model.modules())
    with pytest.raises(TypeError, match="no transform is registered for int"):
        apply_(model, 3)


@pytest.mark.parametrize("config", [WasiConfig(method="asi", activation_threshold=None, finetune_last=1),
                                    LowRankConfig(budget="12MiB", objective="data", thresholds=(0.9, 0.5))])
def test_configs_round_trip_through_json(config):
    again = type(config).from_json(config.to_json())
    assert again == config


@pytest.mark.parametrize("cls,kwargs,field", [
    (WasiConfig, {"method": "lora"}, "method"), (WasiConfig, {"threshold": 1.5}, "threshold"),
    (WasiConfig, {"update": "sgd"}, "update"), (WasiConfig, {"roles": ("fc9",)}, "roles"),
    (LowRankConfig, {"budget": "lots"}, "budget"), (LowRankConfig, {"budget": 1, "rank_grid": -1}, "rank_grid"),
])
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(UserError, match=rf"^{field}\b") as info:
        cls(**kwargs)
    assert "--" not in str(info.value)  # no CLI wording in the API


def test_old_update_spelling_is_accepted():
    assert WasiConfig(update="factored").update == "optimizer-step"


def test_jobs_leave_their_input_unchanged(vit_models, tmp_path):
    """The one rule: transforms change the model in place, jobs (analyze, convert) never do."""
    from wasi_compress.analysis import analyze
    from wasi_compress.convert import ConvertConfig, convert

    model = vit_models.mha_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    doc = analyze(model, batch_size=2)
    convert(model, ConvertConfig(budget=int(doc["totals"]["weight_bytes"] * 0.8)))
    assert [type(m) for m in model.modules()] == modules  # nn.MultiheadAttention not rewritten
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reports_carry_each_figures_source_kind_as_data(vit_models):
    from wasi_compress.convert import ConvertConfig, convert

    doc = convert(_tiny(vit_models), ConvertConfig(budget=200_000)).report
    assert doc["source_kinds"]["total_bytes"] == "derived" and doc["source_kinds"]["params"] == "counted"
    assert doc["source_kinds"]["flops"] == "measured"
    # the kind is data; where the prose names one too, they agree (layers.error's prose names none)
    assert doc["source_kinds"]["layers.error"] == "derived" and not doc["sources"]["layers.error"].startswith("derived")
    for key, kind in doc["source_kinds"].items():
        first = doc["sources"][key].split()[0].rstrip(":")
        assert first not in ("measured", "derived", "counted") or first == kind, (key, kind)


def test_a_failed_commit_restores_the_files_it_replaced(tmp_path):
    from wasi_compress.outputs import Outputs

    ckpt, state = tmp_path / "m.safetensors", tmp_path / "m.safetensors.resume.pt"
    ckpt.write_text("epoch 1")
    outputs = Outputs()
    outputs.stage(ckpt, lambda tmp: tmp.write_text("epoch 2"))
    outputs.stage(state, lambda tmp: tmp.write_text("state 2"))

    def fail():
        raise OSError("disk full")

    outputs.then(fail)
    with pytest.raises(OSError):
        outputs.commit()
    assert ckpt.read_text() == "epoch 1" and not state.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporaries left


def test_a_pass_reverses_only_its_own_replacements(vit_models):
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.replace import ReplaceLinearsPass

    model = _tiny(vit_models)
    cap = capture(model, _batch()[0][:2])
    by_name = {s.name: s for s in cap.sites}

    def rank2(site, dense):
        return SubspaceLinear.from_linear(dense, rank=2)

    first = ReplaceLinearsPass([by_name["blocks.0.mlp.fc1"]], rank2)
    second = ReplaceLinearsPass([by_name["blocks.0.mlp.fc2"]], rank2)
    first(model)
    second(model)
    second.reverse(copy.deepcopy(model))  # marks survive a copy; the original keeps both
    second.reverse(model)
    assert isinstance(model.blocks[0].mlp.fc1, SubspaceLinear)
    assert type(model.blocks[0].mlp.fc2) is torch.nn.Linear
