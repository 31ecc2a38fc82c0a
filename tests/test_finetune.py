"""Fine-tuning (issue 4): the training pass, frozen prefixes, activation planning, memory measurement,
resume, the checkpoint and the command. Tiny models only (dim 32, 2 blocks, 8x8 digits)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.finetune import FinetuneConfig, finetune, measure_step, resume_path
from wasi_compress.measure import LiveTensorBytes, SavedActivationMeter, measure_saved_activations
from wasi_compress.modules.training import ASILinear, CompactInputLinear, WASILinear
from wasi_compress.passes.capture import capture
from wasi_compress.passes.training import (
    TrainingPass, block_of, freeze_before, layer_candidates, plan_activation_ranks, to_inference, trained_blocks,
)

torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def tiny_vit_factory(vit_models):
    """Every test here may build the tiny timm ViT of tests/vit_models.py (the fixture puts it on sys.path)."""
    return vit_models.tiny_timm_vit


@pytest.fixture
def spec():
    """MODEL spec of that ViT."""
    return "vit_models:tiny_timm_vit"


def _tiny():
    from vit_models import tiny_timm_vit

    return tiny_timm_vit()


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------------------- config


def test_config_round_trips_and_validates():
    cfg = FinetuneConfig(model="builtin:mnist-vit", data="digits", method="asi", activation_budget="2MB", finetune_last=2)
    assert FinetuneConfig.from_json(cfg.to_json()) == cfg
    assert cfg.activation_budget_bytes == 2_000_000
    # the defaults: SGD momentum 0.9 at lr 0.01; the paper's SGD without momentum at 0.05; AdamW 3e-4
    assert (cfg.effective_lr, cfg.effective_momentum) == (0.01, 0.9)
    assert FinetuneConfig(model="m:f", data="digits", momentum=0.0).effective_lr == 0.05
    adamw = FinetuneConfig(model="m:f", data="digits", optimizer="adamw")
    assert (adamw.effective_lr, adamw.effective_momentum) == (3e-4, 0.0)
    assert cfg.in_backward and not FinetuneConfig(model="m:f", data="digits", memory_budget="1GB").in_backward
    with pytest.raises(UserError, match="unknown"):
        FinetuneConfig.from_dict({"model": "m:f", "data": "digits", "colour": "red"})


# each bad setting is refused with its own message (naming the setting, the bad value, what is allowed)
BAD_SETTINGS = [
    ({"method": "lora"}, r"method must be one of wasi, asi, vanilla, jactus, got 'lora'"),
    ({"update": "adam"}, r"update must be one of .*subspace-iteration.*, got 'adam'"),
    ({"threshold": 0.0}, r"threshold must be in \(0, 1\], got 0\.0"),
    ({"threshold": 1.5}, r"threshold must be in \(0, 1\], got 1\.5"),
    ({"activation_threshold": 2}, r"activation.threshold must be in \(0, 1\], got 2"),
    ({"epochs": -1}, r"epochs must be an integer >= 0, got -1"),
    ({"batch_size": 0}, r"batch.size must be an integer >= 1, got 0"),
    ({"lr": -1.0}, r"lr must be a positive number, got -1\.0"),
    ({"weight_decay": -1}, r"weight.decay must be a number >= 0, got -1"),
    ({"optimizer": "rmsprop"}, r"optimizer must be one of sgd, adamw, got 'rmsprop'"),
    ({"schedule": "step"}, r"schedule must be one of cosine, constant, got 'step'"),
    ({"momentum": 0.9, "optimizer": "adamw"}, r"momentum applies to .*sgd only"),
    ({"finetune_last": 0}, r"finetune.last must be a positive integer, got 0"),
    ({"activation_budget": "lots"}, r"activation.budget.*cannot read 'lots'"),
    ({"resume": True}, r"resume needs -o"),
    ({"output": "out.pt"}, r"out\.pt.*must have the \.safetensors suffix"),
    ({"method": "vanilla", "activation_budget": "1MB"}, r"activation.budget needs .*wasi or asi"),
    ({"step_in_backward": "yes"}, r"step.in.backward must be true, false or null \(where it can run\), got 'yes'"),
    ({"data": ""}, r"data is empty"),
    ({"method": "jactus", "retain": "120%"}, r"--retain: must be in \(0, 100%\], got '120%'"),
    ({"method": "jactus", "retain": 0}, r"--retain: must be in \(0, 100%\], got 0"),
    ({"method": "jactus", "retain": "most"}, r"--retain: expected a fraction such as 0.8 or a percentage"),
    ({"method": "jactus", "retain": "80%", "budget": "5MB"}, r"--retain: give retain or budget, not both"),
    ({"method": "jactus", "budget": "lots"}, r"--budget.*cannot read 'lots'"),
    ({"method": "wasi", "retain": "80%"}, r"--retain applies to --method jactus only"),
    ({"method": "vanilla", "budget": "5MB"}, r"--budget applies to --method jactus only"),
    ({"method": "jactus", "calib_batches": 0}, r"--calib-batches must be an integer >= 1, got 0"),
    ({"method": "jactus", "memory_budget": "100MB"}, r"--memory-budget cannot be combined with --method jactus"),
]


@pytest.mark.parametrize("bad,message", BAD_SETTINGS, ids=[",".join(b) for b, _ in BAD_SETTINGS])
def test_config_refuses_each_bad_setting_with_its_message(bad, message):
    kwargs = {"model": "builtin:mnist-vit", "data": "digits", **bad}
    with pytest.raises(UserError, match=message):
        FinetuneConfig(**kwargs)


# ------------------------------------------------------------------------------------------- the pass


def test_block_names():
    assert block_of("blocks.3.attn.qkv") == "blocks.3"
    assert block_of("encoder.layer.11.attention.self.query") == "encoder.layer.11"
    assert block_of("layers.2.blocks.5.mlp.fc1") == "layers.2.blocks.5"
    assert block_of("head") is None


@pytest.mark.parametrize("method,update", [("wasi", "subspace-iteration"), ("wasi", "factored"), ("asi", None), ("vanilla", None)])
def test_pass_replaces_block_linears_keeps_the_head_dense_and_trains(method, update):
    """The pass puts the method's module on every block linear and a dense (compact-input) head; a few
    optimizer steps on a fixed batch then lower the loss, every trainable tensor gets a finite gradient
    and moves (subspace iteration: its L, R buffers, inside backward), and to_inference computes what
    the trained model computes."""
    model = _tiny()
    x, y = _batch(16)
    cap = capture(model, x)
    kwargs = {"update": update, "lr": 0.05} if update == "subspace-iteration" else ({"update": update} if update else {})
    p = TrainingPass(cap, method=method, threshold=0.8, activation_threshold=0.8, **kwargs)
    model = p(model).graph_module
    assert type(model.head) is (nn.Linear if method == "vanilla" else CompactInputLinear)
    kinds = {type(model.get_submodule(s.name)) for s in cap.sites if s.role != "head"}
    expected = {"wasi": WASILinear, "asi": ASILinear, "vanilla": nn.Linear}[method]
    assert kinds == {expected}
    if update == "subspace-iteration":
        assert "L" in dict(model.blocks[0].attn.qkv.named_buffers())

    trainable = {n: q for n, q in model.named_parameters() if q.requires_grad}
    if update == "subspace-iteration":  # L, R are buffers updated by the layer itself, not parameters
        assert not any(n.endswith((".L", ".R")) for n in trainable)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.05)
    losses = []
    for step in range(5):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            for n, q in trainable.items():
                assert q.grad is not None and torch.isfinite(q.grad).all(), n
            assert trainable["head.weight"].grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert set(trainable) <= moved, set(trainable) - moved
    assert all(torch.isfinite(after[k]).all() for k in moved)
    if update == "subspace-iteration":
        assert {"blocks.0.attn.qkv.L", "blocks.0.attn.qkv.R", "blocks.1.mlp.fc2.L"} <= moved
    with torch.no_grad():
        trained = model.eval()(x)
    to_inference(model)
    assert not any(isinstance(m, (WASILinear, ASILinear, CompactInputLinear)) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained, rtol=1e-4, atol=1e-5)


def test_finetune_last_freezes_the_prefix_and_saves_nothing_there():
    model = _tiny()
    x, _ = _batch(8)
    cap = capture(model, x)
    assert trained_blocks(cap.sites, 1) == ["blocks.1"]
    with pytest.raises(UserError, match="between 1 and 2"):
        trained_blocks(cap.sites, 3)
    frozen = freeze_before(model, "blocks.1", x)
    assert "cls_token" in frozen and "patch_embed.proj.weight" in frozen and "blocks.0.mlp.fc2.weight" in frozen
    assert model.head.weight.requires_grad and model.blocks[1].attn.qkv.weight.requires_grad
    model.train()
    with SavedActivationMeter(model, {"prefix": model.patch_embed, "block0": model.blocks[0], "block1": model.blocks[1]}) as saved:
        model(x)
    assert saved.per_module["prefix"] == 0 and saved.per_module["block0"] == 0 and saved.per_module["block1"] > 0
    # the same figure through measure.measure_saved_activations: about half of the fully trained model
    assert measure_saved_activations(model, x).total_bytes == saved.total_bytes
    assert saved.total_bytes < 0.6 * measure_saved_activations(_tiny(), x).total_bytes


def test_compact_input_linear_matches_linear_and_saves_one_token():
    torch.manual_seed(0)
    dense = nn.Linear(8, 3)
    compact = CompactInputLinear.from_linear(dense)
    assert compact.weight is dense.weight and compact.bias is dense.bias
    tokens = torch.randn(4, 5, 8, requires_grad=True)
    grads = []
    for layer in (dense, compact):
        with SavedActivationMeter(layer, {"layer": layer}) as saved:
            out = layer(tokens[:, 0])
        out.square().sum().backward()
        grads.append((out.detach(), tokens.grad.clone(), dense.weight.grad.clone()))
        tokens.grad, dense.weight.grad, dense.bias.grad = None, None, None
        grads[-1] += (saved.per_module["layer"],)
    (out_d, gx_d, gw_d, saved_d), (out_c, gx_c, gw_c, saved_c) = grads
    assert torch.equal(out_d, out_c) and torch.allclose(gx_d, gx_c) and torch.allclose(gw_d, gw_c)
    assert saved_d == 4 * 5 * 8 * 4 and saved_c == 4 * 8 * 4


# ------------------------------------------------------------------------------------------- planning


def test_activation_candidates_and_plan_under_budget():
    model = _tiny()
    x, y = _batch(16)
    cap = capture(model, x)
    sites = [s for s in cap.sites if s.role != "head"]
    layers = layer_candidates(model, sites, x, y, thresholds=(0.4, 0.6, 0.8, 0.9))
    assert [layer.name for layer in layers] == [s.name for s in sites]
    assert all(p.grad is None for p in model.parameters())
    for layer in layers:
        exact, *tucker = layer.candidates
        assert exact.error == 0.0 and exact.label == "exact"
        assert all(0 <= c.error < 1.5 for c in tucker)
        assert tucker[0].cost_bytes < exact.cost_bytes
    cheapest = sum(min(c.cost_bytes for c in layer.candidates) for layer in layers)
    chosen = plan_activation_ranks(layers, cheapest * 2)
    assert chosen.plan.total_cost_bytes <= cheapest * 2
    assert set(chosen.ranks) == {s.name for s in sites}
    assert any(r is not None and len(r) == 3 for r in chosen.ranks.values())
    with pytest.raises(InfeasibleBudgetError, match=f"smallest feasible budget is {cheapest} bytes"):
        plan_activation_ranks(layers, cheapest - 1)


def test_planned_ranks_fix_the_compressors():
    model = _tiny()
    x, _ = _batch(16)
    cap = capture(model, x)
    ranks = {s.name: [4, 3, 5] for s in cap.sites if s.role != "head"}
    ranks["blocks.0.attn.qkv"] = None
    model = TrainingPass(cap, method="asi", activation_ranks=ranks)(model).graph_module
    assert type(model.blocks[0].attn.qkv) is nn.Linear  # exact input: stays dense
    assert model.blocks[0].mlp.fc1.compressor.ranks == [4, 3, 5]


# ------------------------------------------------------------------------------------------- memory


def test_live_tensor_bytes_sees_the_peak_and_frees():
    a = torch.zeros(1000)
    with LiveTensorBytes([a]) as live:
        b = torch.ones(3000)  # 12 KB
        c = b * 2  # 12 KB more
        del b, c
        d = torch.ones(10)
    assert live.peak_bytes == 4000 + 24000
    assert live.current_bytes == 4000 + 40
    del d


def test_measure_step_wasi_below_vanilla():
    x, y = _batch(32)
    dense = _tiny()
    cap = capture(dense, x)
    linears = {s.name: s.role for s in cap.sites}
    wasi = TrainingPass(cap, method="wasi", update="subspace-iteration", lr=0.05)(_tiny()).graph_module
    results = {}
    for name, model in (("vanilla", dense), ("wasi", wasi)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        results[name] = measure_step(model, opt, x, y, linears=linears)
    v, w = results["vanilla"], results["wasi"]
    assert w["linear_layers_bytes"] < v["linear_layers_bytes"] / 2
    assert w["grads_bytes"] < v["grads_bytes"] / 5  # subspace iteration: L, R take no gradient
    assert w["peak_bytes"] < v["peak_bytes"]
    assert v["peak_bytes"] >= v["params_bytes"] + v["grads_bytes"]
    assert v["per_layer"]["blocks.0.mlp.fc2"]["saved_input"] == 32 * 5 * 128 * 4  # (B, N, 4*dim) fp32
    # the head reads the class token: vanilla keeps the whole (B, N, dim) norm output, WASI one token
    assert v["per_layer"]["head"]["saved_input"] == 32 * 5 * 32 * 4
    assert w["per_layer"]["head"]["saved_input"] == 32 * 32 * 4
    with SavedActivationMeter(wasi, {"fc": wasi.blocks[0].mlp.fc1}) as saved:
        wasi.train()
        wasi(x)
    assert 0 < saved.per_module["fc"] < 32 * 5 * 32 * 4


# ------------------------------------------------------------------------------------------- runs


class _Interrupt(Exception):
    pass


def _interrupt(epoch, record):
    raise _Interrupt


@pytest.mark.slow  # a fine-tuning run end to end
@pytest.mark.parametrize("update,optimizer,budget,schedule,in_backward", [("subspace-iteration", "sgd", "120KB", "cosine", False),
                                                                          ("factored", "adamw", None, "constant", False),
                                                                          ("factored", "sgd", None, "cosine", True)])
def test_resume_matches_an_uninterrupted_run(spec, tmp_path, update, optimizer, budget, schedule, in_backward):
    kw = dict(model=spec, data="digits", method="wasi", update=update, optimizer=optimizer, activation_budget=budget,
              schedule=schedule, measure_memory=False, seed=3, step_in_backward=in_backward,
              momentum=0.9 if optimizer == "sgd" else 0.0)
    straight = finetune(FinetuneConfig(epochs=2, output=str(tmp_path / "a.safetensors"), **kw))
    out = str(tmp_path / "b.safetensors")
    if schedule == "cosine":  # the schedule spans the run: interrupt a 2-epoch run after its first epoch
        with pytest.raises(_Interrupt):
            finetune(FinetuneConfig(epochs=2, output=out, **kw), on_epoch=_interrupt)
    else:  # constant: a 1-epoch run may be extended
        finetune(FinetuneConfig(epochs=1, output=out, **kw))
    assert resume_path(out).exists()
    resumed = finetune(FinetuneConfig(epochs=2, output=out, resume=True, **kw))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.doc["epochs"] == resumed.doc["epochs"]
    with pytest.raises(UserError, match="seed"):
        finetune(FinetuneConfig(epochs=2, output=out, resume=True, **{**kw, "seed": 4}))


@pytest.mark.slow  # a fine-tuning run end to end
def test_resume_state_from_before_a_new_setting_still_resumes(spec, tmp_path):
    """A resume state written before a setting existed (here step_in_backward) counts it at its default then
    (off); the default now (on where it can run) is another setting, so resuming needs it off."""
    out = str(tmp_path / "a.safetensors")
    kw = dict(model=spec, data="digits", method="wasi", update="factored", schedule="constant", measure_memory=False)
    finetune(FinetuneConfig(epochs=1, output=out, step_in_backward=False, **kw))  # as a run before the setting
    state = torch.load(resume_path(out), weights_only=True)
    config = json.loads(state["config"])
    del config["step_in_backward"]
    state["config"] = json.dumps(config)
    torch.save(state, resume_path(out))
    assert len(finetune(FinetuneConfig(epochs=2, output=out, resume=True, step_in_backward=False, **kw)).doc["epochs"]) == 2
    with pytest.raises(UserError, match="step_in_backward"):
        finetune(FinetuneConfig(epochs=3, output=out, resume=True, step_in_backward=True, **kw))
    with pytest.raises(UserError, match="step_in_backward"):
        finetune(FinetuneConfig(epochs=3, output=out, resume=True, **kw))


def test_grad_core_path_equals_the_direct_path(monkeypatch):
    """The contraction of dY through the compressed input (modules/training.py, asi.grad_core) gives the same
    dX, gradients and subspace-iteration update as the products with dY it replaces."""
    import wasi_compress.modules.training as training
    from wasi_compress.modules.asi import TuckerCompressor

    torch.manual_seed(0)
    linear = nn.Linear(64, 96, dtype=torch.float64)
    x = torch.randn(16, 20, 64, dtype=torch.float64)
    target = torch.randn(16, 20, 96, dtype=torch.float64)
    chooser = training._use_grad_core
    for update, kwargs in (("subspace-iteration", {"lr": 0.1, "weight_decay": 0.01}), ("factored", {})):
        results = []
        for use in (True, False):
            monkeypatch.setattr(training, "_use_grad_core", chooser if use else (lambda *a, **k: False))
            layer = WASILinear.from_linear(linear, rank=24, update=update, compressor=TuckerCompressor(ranks=(4, 6, 10)), **kwargs)
            if use:
                core, factors = layer.compressor.compress(x)
                assert chooser((core, *factors), 96, 24, products=1)  # this size takes the new path
                layer.compressor.factors = None
            xx = x.clone().requires_grad_()
            F.mse_loss(layer(xx), target).backward()
            grads = [] if update != "factored" else [layer.L.grad, layer.R.grad]
            results.append([xx.grad, layer.L.detach(), layer.R.detach(), *grads])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected)


@pytest.mark.slow  # a fine-tuning run end to end
def test_command_end_to_end(spec, tmp_path):
    from click.testing import CliRunner

    from wasi_compress.cli.main import main
    from wasi_compress.loading import load_model
    from wasi_compress.modules.subspace import SubspaceLinear

    out, doc_path = tmp_path / "ft.safetensors", tmp_path / "ft.json"
    runner = CliRunner()
    result = runner.invoke(main, ["finetune", spec, "--data", "digits", "--epochs", "1", "--lr", "0.1",
                                  "-o", str(out), "--json", str(doc_path), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    doc = json.loads(doc_path.read_text())
    assert doc["schema"] == "wasi-compress/finetune/1" and doc["method"] == "wasi" and doc["update"] == "optimizer-step"
    assert len(doc["epochs"]) == 1 and set(doc["epochs"][0]) >= {"loss", "accuracy"}
    assert doc["final"]["accuracy"] == doc["epochs"][-1]["accuracy"]
    keys = {"linear_layers_bytes", "saved_activation_bytes", "params_bytes", "grads_bytes", "optimizer_bytes",
            "peak_bytes", "paper_scope_bytes"}
    assert keys <= set(doc["memory"]) and keys <= set(doc["memory_vanilla"])
    assert doc["memory"]["linear_layers_bytes"] < doc["memory_vanilla"]["linear_layers_bytes"]
    assert doc["step_time_median_s"] > 0 and (tmp_path / "report" / "report.html").exists()
    loaded = load_model(str(out), trust_code=True)  # OUT is a MODEL (it names our own test factory)
    assert isinstance(loaded.model.blocks[1].mlp.fc1, SubspaceLinear) and type(loaded.model.head) is nn.Linear
    assert loaded.metadata["finetune"]["epochs_done"] == 1
    # infeasible activation budget: one line naming the smallest feasible budget, exit 2
    result = runner.invoke(main, ["finetune", spec, "--data", "digits", "--epochs", "0", "--activation-budget", "1KB"])
    assert result.exit_code == 2 and "smallest feasible budget" in result.output


@pytest.mark.slow  # a fine-tuning run end to end
def test_adapted_images_and_classifier_reset(spec, tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(12, 12, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    cfg = FinetuneConfig(model=spec, data=str(tmp_path / "imgs"), method="asi", epochs=1, batch_size=8,
                         measure_memory=False, output=str(tmp_path / "o.safetensors"), finetune_last=1)
    result = finetune(cfg)
    notes = " ".join(result.doc["notes"])
    assert "resized from 12x12 to 8x8" in notes and "grayscale" in notes and "classifier reset from 10 to 3" in notes
    assert result.model.head.out_features == 3
    # --finetune-last 1: block 0 stays dense and frozen, block 1 gets ASI layers
    trained = {layer["name"]: (layer["module"], layer["trained"]) for layer in result.doc["layers"]}
    assert trained["blocks.0.mlp.fc1"] == ("dense", False) and trained["blocks.1.mlp.fc1"] == ("asi", True)
    assert trained["head"] == ("dense", True)
    assert not result.model.blocks[0].mlp.fc1.weight.requires_grad and not result.model.cls_token.requires_grad
    from wasi_compress.loading import load_model

    assert load_model(str(tmp_path / "o.safetensors"), trust_code=True).num_classes == 3


def test_subspace_iteration_is_refused_under_ddp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="cannot run under DDP"):
        finetune(FinetuneConfig(model="builtin:mnist-vit", data="digits", update="subspace-iteration"))
    with pytest.raises(UserError, match="step-in-backward cannot run under DDP"):
        finetune(FinetuneConfig(model="builtin:mnist-vit", data="digits", update="factored", step_in_backward=True))


@pytest.mark.slow  # a fine-tuning run end to end
def test_step_in_backward_trains_like_an_ordinary_step_and_holds_no_gradients(spec):
    """The same run with each optimizer step inside backward gives the same weights, and its measured step
    keeps no gradient tensors (the vanilla baseline is still measured with an ordinary step)."""
    kw = dict(model=spec, data="digits", method="wasi", update="factored", momentum=0.9, lr=0.01, epochs=1, seed=1)
    ordinary = finetune(FinetuneConfig(step_in_backward=False, **kw))
    fused = finetune(FinetuneConfig(step_in_backward=True, **kw))
    assert finetune(FinetuneConfig(**kw)).doc["memory"] == fused.doc["memory"]  # the default: inside backward
    a, b = ordinary.model.state_dict(), fused.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert ordinary.doc["memory"]["grads_bytes"] > 0 and fused.doc["memory"]["grads_bytes"] == 0
    assert fused.doc["memory"]["linear_layers_bytes"] < ordinary.doc["memory"]["linear_layers_bytes"]
    assert fused.doc["memory_vanilla"] == ordinary.doc["memory_vanilla"]
