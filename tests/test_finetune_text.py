"""Fine-tuning text models (issue 10, section 1): a small BertModel (a base encoder, which gets a mean-pool
classification head) and a small BertForSequenceClassification (whose classifier is resized), saved with
save_pretrained beside a word-level tokenizer, fine-tuned on ``text:FILE`` and on the built-in
``stdlib-docs`` task, vanilla, WASI and JACTUS; checkpoints reload as MODEL with the same outputs; bad
text files are one line and exit 2; and the real MiniLM takes a few steps. All offline."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import wasi_compress  # noqa: F401  (before timm and transformers)

transformers = pytest.importorskip("transformers")  # the hf extra, installed by `make setup`

torch.set_num_threads(1)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WORDS = "the a on mat cat dog sat ran red blue green big".split()
BLOCK_LINEARS = 12  # q, k, v, proj, fc1, fc2 in each of the 2 layers


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> folder written by save_pretrained with a tokenizer.json (bare: without one)."""
    root = tmp_path_factory.mktemp("hf-text")
    torch.manual_seed(0)
    config = dict(vocab_size=200, max_position_embeddings=64, **SMALL)
    models = {"bert": transformers.BertModel(transformers.BertConfig(**config)),
              "bertcls": transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **config))}
    out = {}
    for name, model in models.items():
        model.save_pretrained(str(root / name))
        _tokenizer().save(str(root / name / "tokenizer.json"))
        out[name] = root / name
    models["bert"].save_pretrained(str(root / "bare"))
    out["bare"] = root / "bare"
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A learnable two-label task: animal words against colour words, among shared filler words."""
    path = tmp_path_factory.mktemp("task") / "task.tsv"
    rng = random.Random(0)
    lines = []
    for i in range(80):
        label, pool = ("animal", WORDS[4:8]) if i % 2 == 0 else ("colour", WORDS[8:])
        lines.append(f"{label}\t{' '.join(rng.choice(pool + WORDS[:4]) for _ in range(6))}")
    path.write_text("\n".join(lines) + "\n")
    return path


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no network, an empty HF cache


def _one_error_line(result, *fragments: str) -> str:
    """finetune prints its status lines on stdout; the rest of conftest's contract holds."""
    from conftest import _assert_one_line_error

    return _assert_one_line_error(result, *fragments, status_on_stdout=True)


def _finetune(model, data, tmp_path, **kw):
    from wasi_compress.finetune import FinetuneConfig, finetune

    settings = dict(epochs=3, batch_size=16, seq_len=16, output=str(tmp_path / "ft.safetensors"))
    return finetune(FinetuneConfig(model=model, data=str(data), **{**settings, **kw}))


def _same_outputs(trained, path, ids):
    """The checkpoint at `path`, loaded as MODEL, gives what the trained model (in inference form) gives."""
    from wasi_compress.transforms.training import to_inference_

    restored = wasi_compress.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids), to_inference_(copy.deepcopy(trained)).eval()(ids),
                                   rtol=1e-4, atol=1e-5)
    return restored


# -- text:FILE ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method, replaced", [("vanilla", 0), ("wasi", BLOCK_LINEARS)])
def test_a_base_encoder_gets_a_head_learns_the_task_and_reloads(hf_dirs, task, tmp_path, method, replaced):
    result = _finetune(f"hf:{hf_dirs['bert']}", f"text:{task}", tmp_path, method=method, threshold=0.6)
    doc = result.doc
    assert sum(layer["module"] == "wasi" for layer in doc["layers"]) == replaced
    heads = [layer for layer in doc["layers"] if layer["role"] == "head"]
    assert [(h["name"], h["module"]) for h in heads] == [("head.classifier", "dense")]
    assert doc["train_images"] == 64 and doc["test_images"] == 16  # 20% of each label held out
    assert doc["final"]["accuracy"] >= 0.75, doc["epochs"]  # chance is 0.5
    assert doc["memory"]["peak_bytes"] > 0 and doc["memory_vanilla"]["peak_bytes"] > 0
    if method == "wasi":
        assert doc["memory"]["linear_layers_bytes"] < doc["memory_vanilla"]["linear_layers_bytes"]
    ids = torch.zeros(3, 16, dtype=torch.long)
    ids[:, :5] = torch.tensor([[2, 6, 7, 4, 5], [3, 10, 11, 12, 2], [6, 6, 6, 6, 6]])
    restored = _same_outputs(result.model, tmp_path / "ft.safetensors", ids)
    assert restored.num_classes == 2 and restored.token_input.seq_len == 16


@pytest.mark.slow
def test_a_sequence_classifier_is_resized_and_reloads(cli, hf_dirs, task, tmp_path):
    result = _finetune(f"hf:{hf_dirs['bertcls']}", f"text:{task}", tmp_path, epochs=1, threshold=0.6)
    assert "classifier reset from 3 to 2 classes" in " ".join(result.doc["notes"])
    assert sum(layer["module"] == "wasi" for layer in result.doc["layers"]) == BLOCK_LINEARS
    ids = torch.randint(2, len(WORDS) + 2, (2, 16))
    assert _same_outputs(result.model, tmp_path / "ft.safetensors", ids)(ids).shape == (2, 2)
    # a checkpoint carries no tokenizer: fine-tuning it again on text says so
    _one_error_line(cli("finetune", tmp_path / "ft.safetensors", "--data", f"text:{task}", "--epochs", "1"),
                    "no tokenizer.json", "checkpoint")


@pytest.mark.slow
def test_jactus_compresses_and_adapts_a_text_model(hf_dirs, task, tmp_path):
    result = _finetune(f"hf:{hf_dirs['bert']}", f"text:{task}", tmp_path, method="jactus", epochs=1)
    assert sum(layer["module"] == "jactus" for layer in result.doc["layers"]) == BLOCK_LINEARS
    ids = torch.randint(2, len(WORDS) + 2, (2, 16))
    _same_outputs(result.model, tmp_path / "ft.safetensors", ids)


@pytest.mark.slow
def test_same_seed_same_split_and_weights(hf_dirs, task, tmp_path):
    a = _finetune(f"hf:{hf_dirs['bert']}", f"text:{task}", tmp_path / "a", epochs=1, measure_memory=False)
    b = _finetune(f"hf:{hf_dirs['bert']}", f"text:{task}", tmp_path / "b", epochs=1, measure_memory=False)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_resume_continues_a_text_run_to_the_same_weights(hf_dirs, task, tmp_path):
    spec, data = f"hf:{hf_dirs['bert']}", f"text:{task}"
    whole = _finetune(spec, data, tmp_path / "whole", epochs=2, schedule="constant", measure_memory=False)
    _finetune(spec, data, tmp_path / "parts", epochs=1, schedule="constant", measure_memory=False)
    resumed = _finetune(spec, data, tmp_path / "parts", epochs=2, schedule="constant", measure_memory=False, resume=True)
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    from wasi_compress.errors import UserError

    with pytest.raises(UserError, match="seq_len"):
        _finetune(spec, data, tmp_path / "parts", epochs=3, schedule="constant", seq_len=8, resume=True)


def test_a_held_out_file_is_used_as_given(hf_dirs, task, tmp_path):
    from wasi_compress.finetune.text_data import TextData
    from wasi_compress.loading import load_model

    held = tmp_path / "held.tsv"
    held.write_text("colour\tred blue\nanimal\tcat dog\nanimal\tdog\n")
    data = TextData(f"text:{task},{held}", load_model(f"hf:{hf_dirs['bert']}", seq_len=8).model, "cpu")
    assert len(data.train) == 80 and data.test.labels.tolist() == [1, 0, 0]  # labels sorted: animal, colour
    assert data.test.ids[0].tolist() == [10, 11, 0, 0, 0, 0, 0, 0]  # the model's tokenizer, padded with its pad id


# -- the built-in task ---------------------------------------------------------------------------------
@pytest.mark.slow  # reads the standard library's sources twice
def test_the_builtin_task_is_fixed_balanced_and_from_the_standard_library():
    from wasi_compress.finetune.text_data import read_task

    train, test, classes, notes = read_task("stdlib-docs")
    assert classes == sorted(["text", "files", "network", "numbers", "concurrency", "formats"])
    assert (len(train), len(test)) == (1200, 300)
    assert {c: sum(label == c for label, _ in test) for c in classes} == {c: 50 for c in classes}
    assert not {s for _, s in train} & {s for _, s in test}
    assert read_task("stdlib-docs")[:2] == (train, test)  # the same every run
    assert "docstrings" in notes[0]


@pytest.mark.slow
def test_finetune_on_the_builtin_task_through_the_command(cli, hf_dirs, tmp_path):
    out, doc_path = tmp_path / "ft.safetensors", tmp_path / "ft.json"
    result = cli("finetune", f"hf:{hf_dirs['bert']}", "--data", "stdlib-docs", "--epochs", "1", "--seq-len", "16",
                 "--threshold", "0.6", "-o", out, "--json", doc_path)
    assert result.exit_code == 0, result.output
    assert f"linear layers: 2 dense, {BLOCK_LINEARS} wasi" in result.output
    doc = json.loads(doc_path.read_text())
    assert doc["data"] == "stdlib-docs" and doc["test_images"] == 300
    assert doc["memory"]["linear_layers_bytes"] < doc["memory_vanilla"]["linear_layers_bytes"] and len(doc["epochs"]) == 1
    result = cli("analyze", out, "--batch-size", "2")  # the checkpoint is a MODEL, head and all
    assert result.exit_code == 0, result.output
    assert "head.classifier" in result.output
    result = cli("check", doc_path, "--min-accuracy", "0")
    assert result.exit_code == 0, result.output
    small, onnx = tmp_path / "small.safetensors", tmp_path / "small.onnx"  # and it converts, head and all
    result = cli("convert", out, "--budget", "60KB", "-o", small, "--onnx", onnx, "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c.json").read_text())["onnx"]["max_abs_diff"] <= 1e-4
    assert wasi_compress.load(str(small))(torch.ones(2, 16, dtype=torch.long)).shape == (2, 6)


# -- bad input ------------------------------------------------------------------------------------------
TEXT_CASES = {
    "a line without a tab": ("animal\tcat dog\ncolour red blue\n", ["task.tsv:2", "no tab"]),
    "an empty label": ("animal\tcat\n\tred\n", ["task.tsv:2", "empty label"]),
    "no sentence": ("animal\tcat\ncolour\t  \n", ["task.tsv:2", "no sentence"]),
    "an empty file": ("", ["no examples"]),
    "blank lines only": ("\n \n\n", ["no examples"]),
    "one label": ("animal\tcat\nanimal\tdog\nanimal\tsat\n", ["only one label", "animal"]),
    "too few to hold out": ("animal\tcat\ncolour\tred\n", ["too few", "text:TRAIN,TEST"]),
    "not UTF-8": (b"animal\t\xff\xfe\n", ["not a readable UTF-8"]),
}


@pytest.mark.parametrize("content, fragments", list(TEXT_CASES.values()), ids=list(TEXT_CASES))
def test_bad_text_files_are_one_line(cli, hf_dirs, tmp_path, content, fragments):
    path = tmp_path / "task.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = cli("finetune", f"hf:{hf_dirs['bert']}", "--data", f"text:{path}", "--epochs", "1", "--seq-len", "8",
                 "-o", tmp_path / "out.safetensors")
    _one_error_line(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.tsv"]  # nothing written


def test_mismatched_data_and_missing_tokenizers_are_one_line(cli, hf_dirs, task, tmp_path):
    held = tmp_path / "held.tsv"
    held.write_text("bird\ttweet\n")
    bert, short = f"hf:{hf_dirs['bert']}", ("--seq-len", "8")
    named = tmp_path / "data.safetensors"  # a data file an output may not overwrite
    named.write_text(task.read_text())
    cases = [
        ([bert, *short, "--data", "digits"], ["text model", "text:FILE"]),
        (["builtin:mnist-vit", "--data", f"text:{task}"], ["text task", "image model"]),
        ([f"hf:{hf_dirs['bare']}", *short, "--data", f"text:{task}"], ["no tokenizer.json"]),
        ([bert, *short, "--data", f"text:{tmp_path / 'missing.tsv'}"], ["no such file"]),
        ([bert, *short, "--data", f"text:{task},{held}"], ["held.tsv", "bird"]),
        ([bert, *short, "--data", "text:"], ["text:FILE"]),
        ([bert, *short, "--data", f"text:{named}", "-o", named], ["would be overwritten"]),
    ]
    for args, fragments in cases:
        _one_error_line(cli("finetune", *args, "--epochs", "1"), *fragments)


# -- the real MiniLM -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_minilm_fine_tunes_with_wasi(tmp_path):
    """builtin:minilm (a BertModel) gets the mean-pool head, WASI replaces its 36 block linears, a few steps
    run, and the checkpoint reloads from the file alone with the same outputs."""
    path = tmp_path / "task.tsv"
    path.write_text("".join(f"{'question' if i % 2 else 'statement'}\t{s}\n" for i, s in enumerate(
        ["The cat sleeps.", "Where is the cat?", "It rains today.", "Does it rain today?", "Prices went up.",
         "Why did prices go up?", "The train is late.", "When does the train leave?", "She reads a book.",
         "What does she read?"])))
    result = _finetune("builtin:minilm", f"text:{path}", tmp_path, epochs=1, batch_size=4, seq_len=32)
    # the text models' default threshold (0.95): every block linear trained in its subspace (wasi) or, where
    # that rank is above break-even, with a dense weight and a compressed input (asi)
    modules = [layer["module"] for layer in result.doc["layers"] if layer["role"] not in ("head", "other")]
    assert result.doc["threshold"] == 0.95 and len(modules) == 36 and set(modules) == {"wasi", "asi"}
    assert result.doc["memory"]["peak_bytes"] < result.doc["memory_vanilla"]["peak_bytes"]
    from wasi_compress.convert.tokens import tokenize_lines

    ids = tokenize_lines(result.model, ["Is this a question?", "This is a statement."], 32)
    assert _same_outputs(result.model, tmp_path / "ft.safetensors", ids)(ids).shape == (2, 2)


def test_the_default_weight_threshold_depends_on_the_model_kind():
    """Without --threshold: 0.6 for image models, 0.95 for text models; a given threshold is kept."""
    from wasi_compress.finetune import FinetuneConfig

    config = FinetuneConfig(model="builtin:minilm", data="stdlib-docs")
    assert config.threshold is None and config.wasi_config().threshold == 0.6
    assert config.resolved(text_model=True).threshold == 0.95 and config.resolved(text_model=False).threshold == 0.6
    assert FinetuneConfig(model="m", data="d", threshold=0.7).resolved(text_model=True).threshold == 0.7
    assert FinetuneConfig.from_json(config.to_json()).threshold is None


def test_a_text_file_calibrates_on_every_line_unless_told(hf_dirs, tmp_path):
    """convert --objective data --calib FILE on a text model: without --calib-batches every line is a
    calibration sentence (the embedding's token counts need them); with it, the first batches, noted."""
    from wasi_compress.convert import ConvertConfig
    from wasi_compress.convert.tokens import calibration_token_batches
    from wasi_compress.loading import load_model

    model = load_model(f"hf:{hf_dirs['bert']}", seq_len=16).model
    path = tmp_path / "calib.txt"
    rng = random.Random(1)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=6)) for _ in range(100)) + "\n")
    for batches, rows, noted in ((None, 100, False), (2, 64, True)):
        notes: list[str] = []
        config = ConvertConfig(budget="1MB", objective="data", calib=str(path), calib_batches=batches)
        got = calibration_token_batches(config, model, notes)
        assert sum(len(b) for b in got) == rows and all(len(b) <= 32 for b in got)
        assert any("first 64 of its 100 lines" in n for n in notes) is noted
