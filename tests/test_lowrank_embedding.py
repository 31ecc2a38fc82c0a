"""Token embeddings as planner candidates (issue 10, section 2): E ~ A B, its two error measures, the
budget an embedding-dominated model could not reach without it, the checkpoint (restored without
re-planning) and the ONNX export as Gather + MatMul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress  # noqa: F401  (before timm)
from wasi_compress.errors import InfeasibleBudgetError
from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
from wasi_compress.spectrum import errors_for_ranks
from wasi_compress.transforms import LowRankConfig, lowrank_
from wasi_compress.transforms._lowrank_embeddings import row_weights

torch.set_num_threads(1)


class TinyTextModel(nn.Module):
    """An embedding table larger than every linear together, then a small MLP: the shape of a real
    sentence encoder whose vocabulary dominates its bytes."""

    def __init__(self, vocab: int = 600, width: int = 24):
        super().__init__()
        torch.manual_seed(0)  # every instance alike: the tests compare factored copies with the original
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, ids):
        return self.fc2(F.gelu(self.fc1(self.embed(ids))))


def _table(vocab=300, width=20, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(vocab, rank, generator=g) @ torch.randn(rank, width, generator=g)
    return low + 0.05 * torch.randn(vocab, width, generator=g)


def test_full_rank_reproduces_the_table_and_the_forward_is_gather_then_matmul():
    emb = nn.Embedding(50, 12)
    low = LowRankEmbedding.from_embedding(emb, 12)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(low(ids), emb(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low(ids), low.A[ids] @ low.B)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_error_read_off_the_spectrum_is_the_measured_error(weighted):
    """The planner's error for rank k (from one spectrum) equals the measured relative error of the
    factorization: Frobenius for the weight objective, token-weighted for the data objective."""
    table = _table()
    emb = nn.Embedding.from_pretrained(table, freeze=False)
    w = None
    if weighted:
        counts = torch.zeros(300, dtype=torch.float64)
        counts[:40] = torch.arange(40, 0, -1, dtype=torch.float64)  # a skewed calibration distribution
        w = row_weights(counts, padding_idx=None)
    e = table.double()
    scaled = e if w is None else e * w.sqrt()[:, None]
    s = torch.linalg.svdvals(scaled)
    for k in (1, 3, 6, 10):
        low = LowRankEmbedding.from_embedding(emb, k, w)
        diff = e - (low.A.detach().double() @ low.B.detach().double())
        wd = diff if w is None else diff * w.sqrt()[:, None]
        measured = float(wd.norm() / scaled.norm())
        predicted = errors_for_ranks(s.float(), [k])[0]
        assert abs(measured - predicted) < 1e-4, (k, measured, predicted)


def test_weighting_protects_the_frequent_tokens():
    table = _table(rank=12)
    emb = nn.Embedding.from_pretrained(table)
    counts = torch.zeros(300, dtype=torch.float64)
    counts[:10] = 1000.0
    plain = LowRankEmbedding.from_embedding(emb, 4)
    weighted = LowRankEmbedding.from_embedding(emb, 4, row_weights(counts, None))
    frequent = torch.arange(10)
    err = lambda m: float((m(frequent) - emb(frequent)).detach().norm())  # noqa: E731
    assert err(weighted) < 0.8 * err(plain)


def test_row_weights_skip_padding_and_give_unseen_rows_the_good_turing_mass():
    counts = torch.tensor([100.0, 3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    w = row_weights(counts, padding_idx=0)
    assert w[3] > 0 and w[1] > w[2] > w[3]
    assert abs(float(w.sum()) - 1.0) < 1e-12
    # 4 calibration tokens (padding not counted), 1 seen once: the unseen rows (padding among them) share 1/4
    assert torch.allclose(w[[0, 3, 4]], torch.full((3,), 0.25 / 3, dtype=torch.float64))
    assert abs(float(w[1]) - 0.75 * 3 / 4) < 1e-12
    assert torch.allclose(row_weights(torch.zeros(4, dtype=torch.float64), None), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(row_weights(torch.tensor([2.0, 6.0]), None), torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_a_budget_the_embedding_dominates_is_reachable_only_with_it(tmp_path):
    model = TinyTextModel()
    total = sum(p.numel() * 4 for p in model.parameters())
    ids = torch.randint(1, 600, (2, 9))
    with pytest.raises(InfeasibleBudgetError):
        lowrank_(TinyTextModel(), LowRankConfig(budget=total // 2, embeddings=False), example=ids)
    before = model(ids)
    plan = lowrank_(model, LowRankConfig(budget=total // 2), example=ids)
    assert isinstance(plan.model.embed, LowRankEmbedding)
    assert plan.total_bytes <= total // 2
    assert plan.ranks["embed"] is not None
    assert plan.model(ids).shape == before.shape


def test_data_objective_counts_calibration_tokens():
    model = TinyTextModel()
    total = sum(p.numel() * 4 for p in model.parameters())
    calib = [torch.randint(1, 20, (4, 9)) for _ in range(2)]  # only 19 tokens ever appear
    plan = lowrank_(model, LowRankConfig(budget=total // 2, objective="data"), example=calib[0], calib=calib)
    k = plan.ranks["embed"]
    weight_plan = lowrank_(TinyTextModel(), LowRankConfig(budget=total // 2), example=calib[0])
    assert k is not None and weight_plan.ranks["embed"] is not None
    seen = torch.arange(1, 20)
    with torch.no_grad():
        err_data = float((plan.model.embed(seen) - TinyTextModel().embed(seen)).norm())
        err_weight = float((weight_plan.model.embed(seen) - TinyTextModel().embed(seen)).norm())
    if k >= weight_plan.ranks["embed"]:  # at no fewer ranks, the calibration tokens come out closer
        assert err_data < err_weight


@pytest.mark.slow
def test_checkpoint_restores_the_factored_embedding_and_onnx_is_gather_matmul(tmp_path):
    pytest.importorskip("transformers")
    import onnx
    import transformers

    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.inputs import model_example
    from wasi_compress.loading import load_model

    cfg = transformers.BertConfig(vocab_size=3000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    loaded = load_model(f"hf:{tmp_path / 'bert'}", seq_len=16)
    total = sum(p.numel() * 4 for p in loaded.model.parameters())
    out, onnx_path = tmp_path / "c.safetensors", tmp_path / "c.onnx"
    result = convert(loaded, ConvertConfig(budget=total // 2, output=str(out), onnx=str(onnx_path)))
    assert isinstance(result.model.hf.embeddings.word_embeddings, LowRankEmbedding)
    assert result.report["onnx"]["max_abs_diff"] <= 1e-4
    restored = wasi_compress.load(str(out))
    word = restored.hf.embeddings.word_embeddings
    assert isinstance(word, LowRankEmbedding) and word.rank == result.model.hf.embeddings.word_embeddings.rank
    x = model_example(restored, 2)
    with torch.no_grad():
        assert torch.equal(restored(x), result.model(x))
    graph = onnx.load(str(onnx_path)).graph
    gathers = [n for n in graph.node if n.op_type == "Gather" and "hf.embeddings.word_embeddings.A" in n.input]
    assert len(gathers) == 1
    consumers = [n.op_type for n in graph.node if gathers[0].output[0] in n.input]
    assert consumers == ["MatMul"]


def test_model_scale_errors_stop_the_embedding_from_taking_the_whole_cut():
    """Under the data objective with an embedding candidate, errors are put on the model's scale
    (measured: each probe swapped in alone); the plan then matches what the model output says."""
    from wasi_compress.transforms._sensitivity import model_error_scales, rescale  # noqa: F401

    model = TinyTextModel()
    total = sum(p.numel() * 4 for p in model.parameters())
    g = torch.Generator().manual_seed(0)  # 576 calibration tokens of the 600: a sample of the text, not 72
    calib = [torch.randint(1, 600, (8, 9), generator=g) for _ in range(8)]
    auto = lowrank_(TinyTextModel(), LowRankConfig(budget=total // 2, objective="data"), example=calib[0], calib=calib)
    layer = lowrank_(TinyTextModel(), LowRankConfig(budget=total // 2, objective="data", error_scale="layer"),
                     example=calib[0], calib=calib)
    x = torch.randint(1, 600, (64, 9), generator=g)  # fresh text of the same distribution
    with torch.no_grad():
        ref = model(x)
        err = lambda m: float((m(x) - ref).norm() / ref.norm())  # noqa: E731
        assert err(auto.model) <= err(layer.model) + 1e-6
    with pytest.raises(Exception, match="error_scale"):
        LowRankConfig(budget=1000, error_scale="model")  # measured on data: needs the data objective


def test_kept_rows_are_exact_and_the_rest_is_the_weighted_factorization():
    emb = nn.Embedding(300, 20, padding_idx=0)
    emb.weight.data = _table(rank=12)
    kept = torch.tensor([5, 7, 11])
    low = LowRankEmbedding.from_embedding(emb, 4, None, kept)
    plain = LowRankEmbedding.from_embedding(emb, 4)
    rest = torch.tensor([i for i in range(1, 300) if i not in (5, 7, 11)])
    with torch.no_grad():
        assert torch.equal(low(kept), emb(kept))
        assert low.kept == 3 and low.slots.dtype == torch.int32 and float(low.D[-1].abs().sum()) == 0.0
        # the factors serve the other rows alone: no worse on them than the factors of the whole table
        assert float((low(rest) - emb(rest)).norm()) <= float((plain(rest) - emb(rest)).norm()) + 1e-5
    assert "kept=3" in repr(low)


def test_data_objective_keeps_the_calibration_rows_when_they_pay_and_prices_them():
    """A calibration that uses 19 of 600 tokens: keeping those rows exactly costs less than one rank of
    the table, so the plan keeps them; the model's bytes match the planner's accounting (slots counted)."""
    from wasi_compress.transforms.lowrank import param_bytes

    model = TinyTextModel()
    total = sum(p.numel() * 4 for p in model.parameters())
    calib = [torch.randint(1, 20, (4, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = lowrank_(model, LowRankConfig(budget=total // 2, objective="data"), example=calib[0], calib=calib)
    embed = plan.model.embed
    assert isinstance(embed, LowRankEmbedding) and embed.kept > 0
    assert dict(plan.chosen)["embed"].label.endswith(f"+ {embed.kept} rows")
    kept_ids = torch.nonzero(embed.slots < embed.kept).flatten()
    assert set(kept_ids.tolist()) <= set(torch.cat(calib).flatten().tolist())  # calibration tokens only
    with torch.no_grad():
        assert torch.equal(embed(kept_ids), TinyTextModel().embed(kept_ids))
    assert param_bytes(plan.model, torch.float32) + embed.slots.numel() * 4 <= total // 2
    again = lowrank_(TinyTextModel(), LowRankConfig(budget=total // 2, objective="data"), example=calib[0], calib=calib)
    assert all(torch.equal(a, b) for a, b in zip(embed.state_dict().values(), again.model.embed.state_dict().values()))


def test_checkpoint_and_onnx_of_an_embedding_with_kept_rows(tmp_path, monkeypatch):
    import os

    import onnx
    import onnxruntime as ort

    from wasi_compress.checkpoint import save_checkpoint, structure_entry
    from wasi_compress.transforms._lowrank_embeddings import EmbeddingSite

    model = TinyTextModel()
    model.embed = LowRankEmbedding.from_embedding(model.embed, 6, None, torch.tensor([3, 4, 9, 17]))
    ids = torch.tensor([[3, 5, 9, 0, 17, 250, 4, 599]])
    entry = structure_entry(EmbeddingSite("embed", 24, 600, "embed.weight"), model.embed)
    assert entry["kept"] == 4
    out = save_checkpoint(tmp_path / "m.safetensors", model, source={"arch": "test_lowrank_embedding:TinyTextModel"},
                          structure=[entry])
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    restored = wasi_compress.load(str(out), trust_code=True)  # the factory is this test file
    path = tmp_path / "e.onnx"
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(restored(ids), expected)
        torch.onnx.export(model, (ids,), str(path), input_names=["ids"], opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids.numpy()})[0]
    assert float(abs(torch.from_numpy(got) - expected).max()) < 1e-5


def test_padding_positions_are_left_out_of_the_calibration_statistics():
    """A text model whose attention mask hides padding (a token_input with a pad id): its padding rows
    never reach a real token, so the second moments count the real tokens alone."""
    from wasi_compress.hf import TokenInput
    from wasi_compress.passes.capture import capture
    from wasi_compress.transforms._lowrank_candidates import site_weights, whitenings_from

    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
    for pad, rows in ((None, 12), (0, 5)):
        model = TinyTextModel()
        model.token_input = TokenInput(600, 6, pad)
        layers = [site_weights(model, site, 4) for site in capture(model, ids).sites]
        whitenings = whitenings_from(model, layers, [ids], ids.device, lambda *_: None)
        assert {wh.rows for wh in whitenings.values()} == {rows}
        if pad is not None:  # the same second moment as the real tokens' rows alone
            real = model.embed(ids[ids != 0])
            assert torch.allclose(whitenings["fc1"].gram, real.double().T @ real.double())


def test_kept_rows_are_probed_on_rows_held_out_of_the_counts():
    """An embedding's model-scale error is measured on the first calibration rows with the other rows'
    counts: their tokens the others never used meet the factors, as unseen text would. Where the
    held-out rows use only kept rows, no s is measured for those candidates (the plain probes' s stands);
    the plain factorization serves every row, so it is always measured."""
    from wasi_compress.transforms._lowrank_embeddings import embedding_layers
    from wasi_compress.transforms._sensitivity import PLAIN, held_out_scales

    model = TinyTextModel().eval()
    layer = embedding_layers(model, [])[0]
    config = LowRankConfig(budget=10**6, objective="data")
    common = [torch.randint(1, 30, (8, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rare = torch.arange(300, 300 + 8 * 9).reshape(8, 9)  # every token seen by these rows alone
    for first, measured in ((rare, True), (common[0], False)):
        calib = [first, *common]
        counts = torch.bincount(torch.cat(calib).flatten(), minlength=600).to(torch.float64)
        scales = held_out_scales(model, layer, calib, counts, 0, config, 4)
        assert (1.0 in scales) is measured and PLAIN in scales
        if measured:  # the held-out rows' error is real: every probe rank has a positive s
            assert all(s > 0 for _, s in scales[1.0])

