"""JACTUS (issue 9): the layer's exact gradient and what it saves, the union bases, the shrinkage, the
allocation against the DP and brute force, and the transform end to end (budget kept, deterministic,
checkpoint round trip, ONNX parity)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.jactus.allocate import allocate_dp, allocate_greedy
from wasi_compress.jactus.bases import LayerSpectra, energy_rank, union_basis
from wasi_compress.jactus.stats import SecondMoment, shrunk
from wasi_compress.modules.jactus import JactusFunction, JactusLinear
from wasi_compress.transforms.jactus import JactusConfig, jactus_, parse_retain, stored_params


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


# ------------------------------------------------------------------------------------------- the layer


def test_gradient_matches_autograd_of_the_dense_equivalent():
    torch.manual_seed(0)
    q_left, q_right = _orthonormal(12, 5, 1), _orthonormal(9, 4, 2)
    core = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 7, 9, dtype=torch.float64, requires_grad=True)
    y = JactusFunction.apply(x, q_left, q_right, core, bias)
    grad_y = torch.randn_like(y)
    dx, dc, db = torch.autograd.grad(y, (x, core, bias), grad_y)

    core2, bias2, x2 = (t.detach().clone().requires_grad_() for t in (core, bias, x))
    dense = F.linear(x2, q_left @ core2 @ q_right.t(), bias2)  # autograd through W = Q_L C Q_R^T
    torch.testing.assert_close(y, dense)
    ex, ec, eb = torch.autograd.grad(dense, (x2, core2, bias2), grad_y)
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(dc, ec)
    torch.testing.assert_close(db, eb)
    assert torch.autograd.gradcheck(lambda a, c, b: JactusFunction.apply(a, q_left, q_right, c, b),
                                    (x[:1, :2].detach().requires_grad_(), core, bias))


def test_backward_saves_only_the_k_right_wide_projection():
    layer = JactusLinear(_orthonormal(48, 6, 1).float(), _orthonormal(32, 5, 2).float(), torch.randn(6, 5),
                         torch.zeros(48)).train()
    x = torch.randn(4, 10, 32, requires_grad=True)
    params = {t.data_ptr() for t in (layer.Q_L, layer.Q_R, layer.C)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    activations = [tuple(t.shape) for t in saved if t.data_ptr() not in params]
    assert activations == [(4, 10, 5)]  # z = x Q_R: k_R wide, never x (32) or u (6)
    assert not layer.Q_L.requires_grad and not layer.Q_R.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["C", "bias"]


def test_eval_and_train_forward_agree_and_dense_form():
    layer = JactusLinear(_orthonormal(8, 3, 1).float(), _orthonormal(6, 4, 2).float(), torch.randn(3, 4), torch.randn(8))
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x))
    torch.testing.assert_close(layer(x), layer.to_linear()(x))
    assert layer.parameter_count == 8 * 3 + 3 * 4 + 4 * 6 + 8


# ------------------------------------------------------------------------------------------- the bases


def test_union_basis_is_orthonormal_and_starts_with_the_weights_own_subspace():
    first, second = _orthonormal(20, 4, 1), _orthonormal(20, 6, 2)
    second[:, 0] = first[:, 1]  # a task direction the weight already spans adds nothing
    q = union_basis(first, second)
    assert q.shape == (20, 9)
    torch.testing.assert_close(q.t() @ q, torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(q[:, :4], first)                              # the weight's subspace, exactly
    torch.testing.assert_close(q @ (q.t() @ second), second)                 # and the task's, spanned
    assert union_basis(first, second[:, :0]).shape == (20, 4)


def test_layer_spectra_union_contains_the_weight_top_subspace():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 12, generator=g, dtype=torch.float64)
    xs, gs = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(200, 16, generator=g, dtype=torch.float64)
    spectra = LayerSpectra(w, xs.t() @ xs, gs.t() @ gs, gs.t() @ xs, has_bias=True)
    k_w, k_i, k_o = spectra.ranks(0.7, 0.6, 0.5)
    q_left, q_right = spectra.bases(k_w, k_i, k_o)
    u, s, vh = torch.linalg.svd(w)
    for q, top in ((q_left, u[:, :k_w]), (q_right, vh[:k_w].t())):
        torch.testing.assert_close(q.t() @ q, torch.eye(q.shape[1], dtype=torch.float64))
        torch.testing.assert_close(q @ (q.t() @ top), top)  # projection onto the union keeps U_w (V_w)
    choice = spectra.choice(0.7, 0.6, 0.5)
    assert choice.k_left == q_left.shape[1] >= k_w and choice.k_right == q_right.shape[1] >= k_w
    assert 0.7 <= choice.weight_energy <= 1.0 + 1e-9
    assert spectra.choice(1.0).weight_energy == pytest.approx(1.0)


def test_energy_rank():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [energy_rank(values, f) for f in (0.1, 0.4, 0.41, 0.7, 0.9, 1.0)] == [1, 1, 2, 2, 3, 4]


# ------------------------------------------------------------------------------------------- shrinkage


@pytest.mark.slow
def test_shrinkage_matches_ledoit_wolf_and_vanishes_with_many_rows():
    covariance = pytest.importorskip("sklearn.covariance")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 10, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 10, dtype=torch.float64)
    moment = SecondMoment(10)
    moment.update(rows[:17])
    moment.update(rows[17:])
    estimate, rho = shrunk(moment)
    expected, expected_rho = covariance.ledoit_wolf(rows.numpy(), assume_centered=True)
    assert rho == pytest.approx(expected_rho, rel=1e-9)
    torch.testing.assert_close(estimate, torch.from_numpy(expected))
    many = SecondMoment(10)
    many.update(torch.randn(20000, 10, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 10, dtype=torch.float64))
    assert shrunk(many)[1] < 0.01 < rho


# ------------------------------------------------------------------------------------------- allocation


def _brute(costs, gains, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, choice))
        if cost <= budget:
            gain = sum(g[j] for g, j in zip(gains, choice))
            best = gain if best is None else max(best, gain)
    return best


def _instance(rng: random.Random, layers: int, candidates: int):
    costs, gains = [], []
    for _ in range(layers):
        c = sorted(rng.sample(range(1, 60), candidates))
        g = sorted(rng.uniform(0, 1) for _ in range(candidates))
        costs.append(c)
        gains.append(g)
    return costs, gains


@pytest.mark.parametrize("seed", range(40))
def test_greedy_against_dp_and_brute_force(seed):
    rng = random.Random(seed)
    costs, gains = _instance(rng, rng.randint(1, 4), rng.randint(1, 4))
    floor, top = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    budget = rng.randint(floor, top)
    greedy, dp, best = allocate_greedy(costs, gains, budget), allocate_dp(costs, gains, budget), _brute(costs, gains, budget)
    assert dp.total_gain == pytest.approx(best)          # the DP is exact (a byte grid of 1 at this size)
    assert greedy.total_params <= budget and dp.total_params <= budget
    assert greedy.total_gain <= best + 1e-12
    if budget >= top:
        assert greedy.total_gain == pytest.approx(best)  # everything fits: the greedy takes the best of each


def test_greedy_takes_the_best_gain_per_parameter_first():
    costs = [[10, 20, 40], [10, 30]]
    gains = [[0.0, 0.5, 0.6], [0.0, 0.9]]
    # per added parameter: layer 0 -> 1: 0.05, layer 1 -> 1: 0.045, layer 0 -> 2: 0.02
    assert allocate_greedy(costs, gains, 40).choices == (1, 0)
    assert allocate_greedy(costs, gains, 60).choices == (1, 1)
    # where the greedy is not optimal, the DP is: at 40 the greedy's first pick (0.5) leaves too little for
    # layer 1's upgrade, which alone gives 0.9
    assert allocate_greedy(costs, gains, 40).total_gain == pytest.approx(0.5)
    assert allocate_dp(costs, gains, 40).choices == (0, 1)
    with pytest.raises(InfeasibleBudgetError):
        allocate_greedy(costs, gains, -1)


# ------------------------------------------------------------------------------------------- the transform


class TinyBlockNet(nn.Module):
    """Two 'blocks' of fc1/fc2 over 6 tokens of width 16, and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": nn.Linear(32, 16)}) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](F.gelu(b["fc1"](x)))
        return self.head(x.mean(1))


def _calib(n_batches=3, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, 16, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(n_batches)]


def _jactus(retain=0.8, **kwargs):
    model = TinyBlockNet()
    plan = jactus_(model, JactusConfig(retain=retain, roles=("fc1", "fc2"), **kwargs), calib=_calib())
    return model, plan


@pytest.mark.slow
def test_transform_keeps_the_budget_and_is_deterministic():
    original = stored_params(TinyBlockNet())
    model, plan = _jactus(0.8)
    assert all(isinstance(b[k], JactusLinear) for b in model.blocks for k in ("fc1", "fc2"))
    assert stored_params(model) == plan.result_params <= 0.8 * original
    assert plan.greedy["total_params"] <= plan.budget_params and plan.dp["total_gain"] >= plan.greedy["total_gain"] - 1e-6
    again, plan2 = _jactus(0.8)
    assert plan2.to_dict() == plan.to_dict()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    x = _calib(1, seed=5)[0][0]
    assert torch.allclose(model(x), TinyBlockNet()(x), atol=0.5)  # compressed, not a different model
    assert [n for n, p in model.named_parameters() if "blocks" in n] == [
        f"blocks.{i}.{k}.{t}" for i in range(2) for k in ("fc1", "fc2") for t in ("C", "bias")]


@pytest.mark.slow
def test_transform_refuses_a_calibration_set_too_small():
    with pytest.raises(UserError, match="too small for JACTUS: 6 rows .* fewer than the 16 features"):
        jactus_(TinyBlockNet(), JactusConfig(roles=("fc1", "fc2")), calib=_calib(1, batch=1))


@pytest.mark.slow
def test_transform_refuses_an_infeasible_retain():
    with pytest.raises(UserError, match="smallest feasible retained share"):
        _jactus(0.01)


def test_parse_retain():
    assert parse_retain("80%") == pytest.approx(0.8) and parse_retain(0.4) == 0.4 and parse_retain("100%") == 1.0
    for bad in ("0%", "101%", 0, 1.5, "nan", "x", True):
        with pytest.raises(UserError):
            parse_retain(bad)
    assert JactusConfig.from_json(JactusConfig(retain="60%").to_json()) == JactusConfig(retain=0.6)


@pytest.mark.slow
def test_checkpoint_reloads_and_exports_to_onnx(tmp_path):
    """On the embedded ViT: save, load back as MODEL (no calibration), the same outputs, ONNX within 1e-4."""
    from wasi_compress.onnx_export import export_onnx
    from wasi_compress.outputs import Outputs

    model = wasi_compress.load("builtin:mnist-vit")
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    plan = jactus_(model, JactusConfig(retain=0.6), calib=calib)
    assert plan.result_params <= 0.6 * plan.original_params
    path = wasi_compress.save(model, tmp_path / "j.safetensors")
    reloaded = wasi_compress.load(path)
    assert isinstance(reloaded.blocks[0].mlp.fc1, JactusLinear)
    x = calib[0][0][:4]
    torch.testing.assert_close(reloaded(x), model.eval()(x))
    with Outputs() as outputs:
        diff = export_onnx(reloaded, x, tmp_path / "j.onnx", outputs, tolerance=1e-4, opset=17, notes=[])
        outputs.commit()
    assert diff.rel_diff <= 1e-4 and (tmp_path / "j.onnx").is_file()


@pytest.mark.slow
def test_finetune_command_with_jactus(cli, tmp_path):
    """`finetune --method jactus --retain 80%`: the checkpoint holds at most 80% of the parameters, reloads as
    MODEL with the same outputs as the trained model, and the document and report carry the plan."""
    import json

    from wasi_compress.loading import load_model

    out, doc_path = tmp_path / "j.safetensors", tmp_path / "j.json"
    result = cli("finetune", "vit_models:tiny_timm_vit", "--data", "digits", "--method", "jactus", "--retain", "80%",
                 "--epochs", "1", "--calib-batches", "2", "-o", out, "--json", doc_path, "--report", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "JACTUS" in result.output and "exact DP" in result.output
    doc = json.loads(doc_path.read_text())
    plan = doc["jactus"]
    assert doc["method"] == "jactus" and plan["result_params"] <= 0.8 * plan["original_params"]
    assert {layer["role"] for layer in plan["layers"]} == {"qkv", "proj", "fc1", "fc2"}
    assert all(k in plan["layers"][0]["chosen"] for k in ("k_w", "k_i", "k_o", "k_left", "k_right", "weight_energy"))
    loaded = load_model(str(out), trust_code=True)
    assert isinstance(loaded.model.blocks[0].attn.qkv, JactusLinear)
    assert stored_params(loaded.model) == plan["result_params"]
    assert (tmp_path / "r" / "finetune-jactus-ranks.png").is_file()


def test_jactus_default_learning_rate():
    from wasi_compress.finetune import FinetuneConfig

    assert FinetuneConfig(model="builtin:mnist-vit", data="digits", method="jactus").effective_lr == 0.03
    assert FinetuneConfig(model="builtin:mnist-vit", data="digits", method="jactus", lr=0.01).effective_lr == 0.01
    assert FinetuneConfig(model="builtin:mnist-vit", data="digits", method="jactus", momentum=0).effective_lr == 0.05
    assert FinetuneConfig(model="builtin:mnist-vit", data="digits", method="vanilla").effective_lr == 0.01


@pytest.mark.slow
def test_analyze_shows_the_plan_finetune_trains(cli, tmp_path):
    """`analyze --jactus-data` prints and writes the same per-layer ranks that `finetune --method jactus`
    then trains with (same data, calibration and allocation), and its report carries the ranks plot."""
    import json

    args = ("--jactus-data", "digits", "--retain", "60%", "--calib-batches", "1")
    result = cli("analyze", "vit_models:tiny_timm_vit", *args, "--json", tmp_path / "a.json", "--report", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "k_w" in result.output and "exact DP" in result.output
    planned = json.loads((tmp_path / "a.json").read_text())["jactus"]
    result = cli("finetune", "vit_models:tiny_timm_vit", "--data", "digits", "--method", "jactus", "--retain", "60%",
                 "--calib-batches", "1", "--epochs", "0", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "f.json").read_text())["jactus"]
    assert [(l["name"], l["chosen"]) for l in planned["layers"]] == [(l["name"], l["chosen"]) for l in trained["layers"]]
    assert planned["result_params"] == trained["result_params"] <= 0.6 * planned["original_params"]
    assert (tmp_path / "r" / "analyze-jactus-ranks.png").is_file()


def test_analyze_retain_needs_jactus_data(cli):
    result = cli("analyze", "vit_models:tiny_timm_vit", "--retain", "60%")
    assert result.exit_code == 2 and "--jactus-data" in result.output


@pytest.mark.slow
def test_resumed_jactus_run_equals_an_uninterrupted_one(vit_models, tmp_path):
    """--resume rebuilds the same bases and ranks (the same calibration batches) and continues to the
    weights of an uninterrupted run."""
    from wasi_compress.finetune import FinetuneConfig, finetune, resume_path

    class Interrupt(Exception):
        pass

    def interrupt(epoch, record):
        raise Interrupt

    kw = dict(model="vit_models:tiny_timm_vit", data="digits", method="jactus", retain="70%", calib_batches=1,
              measure_memory=False, seed=5, trust_code=True)
    straight = finetune(FinetuneConfig(epochs=2, output=str(tmp_path / "a.safetensors"), **kw))
    out = str(tmp_path / "b.safetensors")
    with pytest.raises(Interrupt):
        finetune(FinetuneConfig(epochs=2, output=out, **kw), on_epoch=interrupt)
    assert resume_path(out).exists()
    resumed = finetune(FinetuneConfig(epochs=2, output=out, resume=True, **kw))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(isinstance(m, JactusLinear) for m in resumed.model.modules())
