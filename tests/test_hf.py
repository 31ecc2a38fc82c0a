"""Hugging Face models as MODEL (issue 10, section 1): HF ViT, DeiT, Swin and BERT built from small
configs and saved with save_pretrained are analyzed (captured by transformers' fx tracer, not the hooks
fallback), converted with an ONNX parity check, reloaded from the checkpoint alone, gated by `check`,
and (vision) fine-tuned; all offline, with an empty HF cache."""

from __future__ import annotations

import json

import pytest
import torch

import wasi_compress  # noqa: F401  (before timm and transformers)

transformers = pytest.importorskip("transformers")  # the hf extra, installed by `make setup`

torch.set_num_threads(1)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
ROLES = {"q", "k", "v", "proj", "fc1", "fc2"}


def _models():
    t = transformers
    return {
        "vit": t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, num_labels=10, **SMALL)),
        "deit": t.DeiTForImageClassification(t.DeiTConfig(image_size=32, patch_size=8, num_labels=10, **SMALL)),
        "swin": t.SwinForImageClassification(t.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1],
                                                           num_heads=[2, 2], window_size=4, num_labels=10)),
        "bert": t.BertModel(t.BertConfig(vocab_size=200, max_position_embeddings=64, **SMALL)),
        "bertcls": t.BertForSequenceClassification(t.BertConfig(vocab_size=200, max_position_embeddings=64,
                                                                num_labels=3, **SMALL)),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> folder written by save_pretrained (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, model in _models().items():
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no network, an empty HF cache


def _load(spec, **kw):
    from wasi_compress.loading import load_model

    return load_model(spec, **kw)


# -- loading and inputs ---------------------------------------------------------------------------
def test_vision_input_comes_from_the_config(hf_dirs):
    loaded = _load(f"hf:{hf_dirs['vit']}")
    assert loaded.input_size == (3, 32, 32)
    assert loaded.num_classes == 10
    ref = transformers.ViTForImageClassification.from_pretrained(str(hf_dirs["vit"]), local_files_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(pixel_values=x).logits)  # the saved weights, the logits


def test_text_input_is_token_ids_of_seq_len_with_padding(hf_dirs):
    from wasi_compress.inputs import model_example

    loaded = _load(f"hf:{hf_dirs['bert']}", seq_len=16)
    assert loaded.input_size == (16,)
    ids = model_example(loaded.model, 3)
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert (ids[0] != 0).all() and (ids[2, -2:] == 0).all()  # rows after the first end in padding
    assert _load(f"hf:{hf_dirs['bert']}").input_size == (64,)  # default 128, capped at the model's positions


def test_the_attention_mask_follows_the_padding(hf_dirs):
    """A padded row gives the same hidden states on its real tokens as the unpadded sequence."""
    loaded = _load(f"hf:{hf_dirs['bert']}", seq_len=12)
    ids = torch.randint(1, 200, (1, 12))
    padded = ids.clone()
    padded[0, 8:] = 0
    with torch.no_grad():
        short = loaded.model(ids[:, :8])
        full = loaded.model(padded)
    torch.testing.assert_close(full[:, :8], short, rtol=1e-5, atol=1e-5)


def test_random_init_from_a_config_is_deterministic(hf_dirs):
    spec = f"hf:BertForSequenceClassification:{hf_dirs['bertcls'] / 'config.json'}"
    a, b = _load(spec, seq_len=8), _load(spec, seq_len=8)
    assert a.num_classes == 3
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


# -- capture --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "deit", "swin", "bert"])
def test_capture_uses_hf_fx_and_finds_every_role(hf_dirs, name):
    from wasi_compress.inputs import model_example
    from wasi_compress.passes.capture import capture

    model = _load(f"hf:{hf_dirs[name]}", seq_len=16).model
    x = model_example(model, 2)
    cap = capture(model, x)
    assert cap.method == "fx", cap.note
    assert cap.note is None
    assert not cap.skipped
    roles = {s.role for s in cap.sites}
    assert ROLES <= roles, roles
    with torch.no_grad():  # the graph computes what the model computes, padding included
        torch.testing.assert_close(cap.graph_module(x), model(x), rtol=0, atol=0)


# -- analyze, convert, check, reload ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "deit", "swin", "bert"])
def test_analyze_convert_onnx_check_and_reload(cli, hf_dirs, tmp_path, name):
    from wasi_compress.inputs import model_example

    spec = f"hf:{hf_dirs[name]}"
    text = ["--seq-len", "16"] if name == "bert" else []
    result = cli("analyze", spec, "--batch-size", "2", "--json", tmp_path / "a.json", *text)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["capture"] == "fx" and doc["capture_note"] is None
    assert ROLES <= {layer["role"] for layer in doc["layers"]}
    budget = doc["totals"]["weight_bytes"] * 3 // 4
    out, onnx = tmp_path / "c.safetensors", tmp_path / "c.onnx"
    result = cli("convert", spec, "--budget", budget, "-o", out, "--onnx", onnx, "--json", tmp_path / "c.json", *text)
    assert result.exit_code == 0, result.output
    conv = json.loads((tmp_path / "c.json").read_text())
    assert conv["onnx"]["max_abs_diff"] <= 1e-4
    assert conv["total_bytes"] <= budget
    assert out.stat().st_size < doc["totals"]["weight_bytes"]
    result = cli("check", tmp_path / "c.json", "--max-onnx-diff", "1e-4", "--max-size", budget)
    assert result.exit_code == 0, result.output

    restored = wasi_compress.load(str(out))  # from the file alone: no folder, no re-planning
    converted = _load(str(out)).model
    x = model_example(restored, 2)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), converted(x), rtol=0, atol=0)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(got) - restored(x)).abs().max()) <= 1e-4


@pytest.mark.slow
def test_convert_text_with_the_data_objective_on_random_tokens(hf_dirs, tmp_path):
    from wasi_compress.convert import ConvertConfig, convert

    loaded = _load(f"hf:{hf_dirs['bert']}", seq_len=16)
    total = sum(p.numel() * 4 for p in loaded.model.parameters())
    result = convert(loaded, ConvertConfig(budget=str(total * 3 // 4), objective="data", calib="random",
                                           calib_batches=2))
    assert result.report["total_bytes"] <= total * 3 // 4
    assert result.report["calibration"]["data"] == "random"


@pytest.mark.slow
def test_finetune_an_hf_vit_with_wasi(cli, hf_dirs, tmp_path):
    out = tmp_path / "ft.safetensors"
    result = cli("finetune", f"hf:{hf_dirs['vit']}", "--data", "digits", "--epochs", "1", "-o", out,
                 "--json", tmp_path / "ft.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "ft.json").read_text())
    assert sum(layer["module"] == "wasi" for layer in doc["layers"]) == 12  # every block linear, not the head
    assert doc["memory"]["peak_bytes"] < doc["memory_vanilla"]["peak_bytes"]
    model = wasi_compress.load(str(out))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# -- bad input --------------------------------------------------------------------------------------
def test_bad_hf_input_is_one_line(cli, assert_one_line_error, hf_dirs, tmp_path):
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((hf_dirs["vit"] / "config.json").read_text())
    cfg = hf_dirs["bert"] / "config.json"
    cases = [
        (f"hf:{tmp_path / 'noconfig'}", ["no config.json"]),
        (f"hf:{tmp_path / 'missing'}", ["no such folder"]),
        (f"hf:{tmp_path / 'gpt2'}", ["gpt2", "not supported"]),
        (f"hf:{tmp_path / 'noweights'}", ["no model.safetensors"]),
        (f"hf:NoSuchModel:{cfg}", ["NoSuchModel", "not a supported"]),
        (f"hf:GPT2Model:{cfg}", ["GPT2Model"]),
        (f"hf:BertModel:{tmp_path / 'nothere.json'}", ["nothere.json"]),
        ("hf:", ["hf:"]),
    ]
    for spec, fragments in cases:
        assert_one_line_error(cli("analyze", spec), *fragments)
    assert_one_line_error(cli("analyze", f"hf:{hf_dirs['bert']}", "--seq-len", "65"), "65", "64")
    before = (hf_dirs["vit"] / "model.safetensors").read_bytes()
    assert_one_line_error(cli("convert", f"hf:{hf_dirs['vit']}", "--budget", "1MB", "-o",
                              hf_dirs["vit"] / "model.safetensors"), "inside the input folder MODEL")
    assert (hf_dirs["vit"] / "model.safetensors").read_bytes() == before
    assert_one_line_error(cli("analyze", "timm:vit_tiny_patch16_224", "--seq-len", "8"), "--seq-len")


# -- the real pretrained MiniLM ----------------------------------------------------------------------
@pytest.mark.slow
def test_builtin_minilm_is_the_real_pretrained_model_offline():
    from wasi_compress.convert.tokens import tokenize_lines

    loaded = _load("builtin:minilm", seq_len=32)
    model = loaded.model
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert loaded.input_size == (32,)
    ids = tokenize_lines(model, ["A man is playing a guitar.", "Someone plays a musical instrument.",
                                 "The stock market fell sharply today."], 32)
    assert ids[0, 0] == 101 and (ids[0, -1] == 0)  # [CLS] first, padded with [PAD]
    with torch.no_grad():
        hidden = model(ids)
    mask = (ids != 0).unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related > unrelated + 0.2, (related, unrelated)  # trained weights, not a random init


def test_a_training_step_on_token_ids(hf_dirs):
    """train_step on a text classifier: the batch is integer ids, the loss a float."""
    from wasi_compress.finetune import after_step_fn, train_step
    from wasi_compress.inputs import model_example

    model = _load(f"hf:{hf_dirs['bertcls']}", seq_len=8).model.train()
    x, y = model_example(model, 4), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, out = train_step(model, opt, x, y, after_step_fn(model))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and out.shape == (4, 3)
