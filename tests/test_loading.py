"""The MODEL argument: timm:, builtin:, package.module:factory, weights files with --arch or --weights,
safe torch loading (weights_only), and one clear line with exit code 2 for every kind of bad input."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.loading import load_model, resolve_device
from wasi_compress.weights import read_state_dict

FACTORY = "vit_models:functional_head_vit"


# --------------------------------------------------------------------------------------------------
# helpers


def _perturbed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that differs from a freshly built model's, so loading it is observable."""
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _same_params(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


class _Marker:
    """Unpickling this object opens (creates) a file: the stand-in for arbitrary code in a checkpoint.
    builtins.open is pickled by reference, so the payload runs only if the unpickler resolves it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_malicious(path, marker, fmt: str) -> None:
    payload = {"weight": torch.zeros(2, 2), "payload": _Marker(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle stream, protocol 4
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)


# --------------------------------------------------------------------------------------------------
# the accepted forms


def test_timm_spec_is_built_without_pretrained_weights_and_passes_sizes_through(monkeypatch):
    import timm

    calls = []
    create = timm.create_model

    def spy(name, **kwargs):
        calls.append((name, kwargs))
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    loaded = load_model("timm:test_vit", num_classes=5, img_size=64)  # timm's own tiny test ViT: fast
    assert calls == [("test_vit", {"pretrained": False, "num_classes": 5, "img_size": 64})]
    assert loaded.num_classes == 5
    assert loaded.input_size == (3, 64, 64)
    assert not loaded.model.training
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_timm_default_input_size_and_normalisation():
    import timm

    loaded = load_model("timm:test_vit")
    cfg = timm.create_model("test_vit").pretrained_cfg
    assert loaded.input_size == tuple(cfg["input_size"]) == (3, 160, 160)
    assert (loaded.mean, loaded.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert loaded.num_classes == 1000 and loaded.spec == "timm:test_vit"


def test_factory_spec_passes_num_classes_and_img_size(vit_models):
    loaded = load_model(FACTORY, num_classes=7, img_size=48)
    assert isinstance(loaded.model, vit_models.FunctionalHeadViT)
    assert loaded.model.head_weight.shape == (7, vit_models.DIM)
    assert loaded.input_size == (3, 48, 48)
    assert loaded.num_classes == 7
    assert not loaded.model.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_factory_with_weights_file(vit_models, tmp_path, suffix):
    state = _perturbed_state(vit_models.functional_head_vit())
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_model(FACTORY, weights=str(path))
    assert _same_params(loaded.model, state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_state_dict_file_with_arch_factory(vit_models, tmp_path, suffix):
    state = _perturbed_state(vit_models.functional_head_vit())
    path = tmp_path / f"model{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_model(str(path), arch=FACTORY)
    assert _same_params(loaded.model, state)
    assert loaded.spec == str(path)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_state_dict_nested_in_a_training_checkpoint(vit_models, tmp_path, key):
    state = _perturbed_state(vit_models.functional_head_vit())
    path = tmp_path / "ckpt.pt"
    torch.save({key: state, "epoch": 3, "lr": 0.1}, path)
    assert _same_params(load_model(str(path), arch=FACTORY).model, state)


def test_state_dict_file_with_arch_timm(tmp_path):
    import timm

    state = _perturbed_state(timm.create_model("test_vit", img_size=32, num_classes=3))
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    loaded = load_model(str(path), arch="timm:test_vit", img_size=32, num_classes=3)
    assert _same_params(loaded.model, state)
    assert loaded.input_size == (3, 32, 32)
    assert loaded.num_classes == 3


def test_torch_files_are_read_with_weights_only(vit_models, tmp_path, monkeypatch):
    state = vit_models.functional_head_vit().state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(str(path), arch=FACTORY)
    load_model(FACTORY, weights=str(path))
    assert seen == [True, True]


def test_whole_pickled_module_needs_trust_pickle(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded.model, nn.Sequential)
    assert torch.equal(loaded.model[1].weight, model[1].weight)
    # a weights file for an architecture may also hold a whole module: its state dict is used
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model("torch.nn:Identity", weights=str(path))


# --------------------------------------------------------------------------------------------------
# a checkpoint whose pickle would run code is refused without running it


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("how", ["model", "arch", "weights"])
def test_malicious_pickle_is_refused_without_running(vit_models, tmp_path, fmt, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, fmt)
    assert not marker.exists()
    kwargs = {"model": dict(spec=str(path)), "arch": dict(spec=str(path), arch=FACTORY),
              "weights": dict(spec=FACTORY, weights=str(path))}[how]
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(**kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
def test_malicious_payload_is_real(tmp_path, fmt):
    """Control for the test above: unpickled without weights_only, the payload does run (it only creates
    an empty file in tmp_path)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, fmt)
    if fmt == "raw":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_refused_by_the_cli(cli, tmp_path, assert_one_line_error):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, "zip")
    assert_one_line_error(cli("analyze", path), "trust-pickle")
    assert_one_line_error(cli("analyze", path, "--arch", FACTORY), "trust-pickle")
    assert_one_line_error(cli("analyze", FACTORY, "--weights", path), "trust-pickle")
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_pickle_refused_by_the_real_command(run_wasi_compress, tmp_path):
    """A fresh process: exit 2, one line on stderr (torch's pickle-protocol warning included in what must
    not appear), and the payload never ran."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, "raw")
    proc = run_wasi_compress("analyze", path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "--trust-pickle" in proc.stderr
    assert proc.stdout == ""
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# bad input: UserError from the API, one line and exit 2 from the CLI


def _bad_inputs(tmp_path, vit_models):
    """(MODEL and options, fragments the one-line message must contain)."""
    state = vit_models.functional_head_vit().state_dict()
    sd_pt = tmp_path / "sd.pt"
    torch.save(state, sd_pt)
    sd_st = tmp_path / "sd.safetensors"
    save_file(state, str(sd_st))
    raw = sd_pt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    raw = sd_st.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "header_cut.safetensors").write_bytes(raw[:20])
    (tmp_path / "empty.pt").write_bytes(b"")
    misfit = dict(state)
    misfit.pop("blocks.0.attn.qkv.weight")
    misfit.pop("blocks.1.mlp.fc2.bias")
    misfit["extra.weight"] = torch.zeros(3)
    torch.save(misfit, tmp_path / "misfit.pt")
    misshapen = dict(state)
    misshapen["head_weight"] = torch.zeros(3, vit_models.DIM)
    save_file(misshapen, str(tmp_path / "misshapen.safetensors"))
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.pt").mkdir()
    t = str(tmp_path)
    return {
        "missing file": ([f"{t}/nope.pt"], ["nope.pt", "no such file"]),
        "missing weights": ([FACTORY, "--weights", f"{t}/nope.safetensors"], ["no such file"]),
        "folder": ([f"{t}/folder.pt"], ["folder"]),
        "unknown suffix": ([f"{t}/notes.txt"], [".txt"]),
        "truncated torch file": ([f"{t}/truncated.pt", "--arch", FACTORY], ["truncated"]),
        "truncated safetensors": ([f"{t}/truncated.safetensors", "--arch", FACTORY], ["truncated"]),
        "safetensors header cut": ([f"{t}/header_cut.safetensors", "--arch", FACTORY], ["safetensors"]),
        "empty torch file": ([f"{t}/empty.pt", "--arch", FACTORY], ["empty.pt"]),
        "state dict does not fit": ([f"{t}/misfit.pt", "--arch", FACTORY],
                                    ["2 missing", "first: blocks.0.attn.qkv.weight", "1 unexpected", "first: extra.weight"]),
        "state dict of another shape": ([f"{t}/misshapen.safetensors", "--arch", FACTORY], ["head_weight", "(3, 32)", "(10, 32)"]),
        "state dict without arch": ([f"{t}/sd.pt"], ["--arch"]),
        "safetensors without arch": ([f"{t}/sd.safetensors"], ["--arch"]),
        "untrusted pickle": ([f"{t}/whole.pt"], ["--trust-pickle"]),
        "unknown timm name": (["timm:vit_tiny_patch16_22"], ["unknown timm model", "did you mean", "vit_tiny_patch16_224"]),
        "unknown timm name, nothing close": (["timm:qqqqqqqq"], ["unknown timm model", "qqqqqqqq"]),
        "empty timm name": (["timm:"], ["model name"]),
        "timm model without img_size": (["timm:resnet18", "--img-size", "64"], ["--img-size"]),
        "unknown builtin": (["builtin:imagenet-vit"], ["mnist-vit"]),
        "factory module missing": (["no_such_module_xyz:make"], ["cannot import", "no_such_module_xyz"]),
        "factory attribute missing": (["vit_models:no_such_factory"], ["no_such_factory"]),
        "factory returns no module": (["vit_models:not_a_module"], ["not an nn.Module"]),
        "factory without num_classes": (["torch.nn:ReLU", "--num-classes", "3"], ["--num-classes"]),
        "arch with an architecture": ([FACTORY, "--arch", FACTORY], ["--arch"]),
        "weights with a file": ([f"{t}/sd.pt", "--weights", f"{t}/sd.pt"], ["--weights"]),
    }


_BAD = [
    "missing file", "missing weights", "folder", "unknown suffix", "truncated torch file", "truncated safetensors",
    "safetensors header cut", "empty torch file", "state dict does not fit", "state dict of another shape",
    "state dict without arch", "safetensors without arch", "untrusted pickle", "unknown timm name",
    "unknown timm name, nothing close", "empty timm name", "timm model without img_size", "unknown builtin",
    "factory module missing", "factory attribute missing", "factory returns no module", "factory without num_classes",
    "arch with an architecture", "weights with a file",
]


def _load_kwargs(args: list[str]) -> dict:
    spec, rest = args[0], args[1:]
    names = {"--arch": "arch", "--weights": "weights", "--img-size": "img_size", "--num-classes": "num_classes"}
    kwargs = {}
    for opt, value in zip(rest[::2], rest[1::2]):
        kwargs[names[opt]] = int(value) if opt in ("--img-size", "--num-classes") else value
    return dict(spec=spec, **kwargs)


@pytest.mark.parametrize("case", _BAD)
def test_bad_input_raises_user_error(vit_models, tmp_path, case):
    args, fragments = _bad_inputs(tmp_path, vit_models)[case]
    with pytest.raises(UserError) as info:
        load_model(**_load_kwargs(args))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


@pytest.mark.parametrize("case", _BAD)
def test_bad_input_is_one_line_and_exit_2_in_the_cli(cli, vit_models, tmp_path, case, assert_one_line_error):
    args, fragments = _bad_inputs(tmp_path, vit_models)[case]
    assert_one_line_error(cli("analyze", *args), *fragments)


def test_bad_input_cases_are_all_exercised(vit_models, tmp_path):
    assert sorted(_bad_inputs(tmp_path, vit_models)) == sorted(_BAD)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(vit_models, tmp_path, cli, assert_one_line_error):
    path = tmp_path / "locked.pt"
    torch.save(vit_models.functional_head_vit().state_dict(), path)
    path.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot read"):
            load_model(str(path), arch=FACTORY)
        assert_one_line_error(cli("analyze", path, "--arch", FACTORY), "cannot read")
    finally:
        path.chmod(0o600)


def test_unreadable_file_simulated(vit_models, tmp_path, monkeypatch, cli, assert_one_line_error):
    """The same check where the tests run as root: opening the file fails with EACCES."""
    import errno

    from wasi_compress import weights

    path = tmp_path / "locked.pt"
    torch.save(vit_models.functional_head_vit().state_dict(), path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(weights, "open", refuse, raising=False)  # shadows the builtin inside weights.py only
    with pytest.raises(UserError, match="cannot read .Permission denied."):
        load_model(str(path), arch=FACTORY)
    assert_one_line_error(cli("analyze", path, "--arch", FACTORY), "cannot read")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_file_cut_anywhere_is_a_user_error(tmp_path, legacy):
    """Damaged files fail deep inside torch's reader with all kinds of errors (KeyError, IndexError,
    struct.error for the legacy format): every one is a UserError."""
    state = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).state_dict()
    whole = tmp_path / "whole.pt"
    torch.save(state, whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in sorted({0, 1, 2, 8, 16, 50, 100, 172, 258, 430, 602} | set(range(0, len(data), len(data) // 25))):
        if n >= len(data):
            continue
        cut.write_bytes(data[:n])
        with pytest.raises(UserError):
            read_state_dict(cut)


def test_read_state_dict_of_a_garbage_file_is_a_user_error(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------------
# builtin:mnist-vit (weights shipped in the package, provenance beside them)


@pytest.fixture(scope="module")
def mnist_vit():
    return load_model("builtin:mnist-vit")


@pytest.fixture(scope="module")
def mnist_test():
    from wasi_compress.data import load_images

    return load_images("mnist", "test")


def test_builtin_mnist_vit_loads(mnist_vit):
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(mnist_vit.model, VisionTransformer)
    assert mnist_vit.num_classes == 10
    assert mnist_vit.input_size == (1, 28, 28)
    assert mnist_vit.mean == (0.5,) and mnist_vit.std == (0.5,)
    assert not mnist_vit.model.training
    with torch.no_grad():
        assert mnist_vit.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_builtin_mnist_vit_weights_are_safetensors_with_provenance():
    from wasi_compress.builtin import mnist_vit

    assert mnist_vit.WEIGHTS.suffix == ".safetensors" and mnist_vit.WEIGHTS.is_file()
    prov = mnist_vit.provenance()
    assert prov["model"] == "builtin:mnist-vit"
    assert 0.0 <= prov["test_accuracy"] <= 1.0
    assert prov["split"]["test"] == 1000 and prov["split"]["train"] == 4000


@pytest.mark.slow  # the whole MNIST test set through the builtin model
def test_builtin_mnist_vit_accuracy_matches_provenance(mnist_vit, mnist_test):
    from wasi_compress.builtin import mnist_vit as builtin
    from wasi_compress.data import normalize

    assert len(mnist_test) == builtin.provenance()["split"]["test"]
    x = normalize(mnist_test.images, mnist_vit.mean, mnist_vit.std)
    with torch.no_grad():
        correct = sum((mnist_vit.model(x[i:i + 250]).argmax(1) == mnist_test.labels[i:i + 250]).sum().item()
                      for i in range(0, len(mnist_test), 250))
    accuracy = correct / len(mnist_test)
    assert abs(accuracy - builtin.provenance()["test_accuracy"]) <= 0.005, accuracy


def test_builtin_refuses_img_size():
    with pytest.raises(UserError, match="fixed input size"):
        load_model("builtin:mnist-vit", img_size=32)


@pytest.mark.slow  # reads the MNIST test split
def test_mnist_test_split_is_stratified(mnist_test):
    assert mnist_test.images.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(mnist_test.images.min()) <= float(mnist_test.images.max()) <= 1.0
    assert torch.bincount(mnist_test.labels, minlength=10).tolist() == [100] * 10


def test_split_does_not_depend_on_the_global_seed():
    import numpy as np

    from wasi_compress.data import _stratified_split

    labels = np.repeat(np.arange(10), 500)
    torch.manual_seed(1)
    np.random.seed(1)
    train, test = _stratified_split(labels, 0.2)
    torch.manual_seed(2)
    np.random.seed(2)
    train2, test2 = _stratified_split(labels, 0.2)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.array_equal(train, train2) and np.array_equal(test, test2)
    assert not set(train) & set(test)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_errors_are_one_line_in_the_python_api_too():
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.finetune import FinetuneConfig, finetune

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a torch device"):
        resolve_device("no-such-device")
    with pytest.raises(UserError, match="CUDA is not available"):
        finetune(FinetuneConfig(model="builtin:mnist-vit", data="digits", device="cuda"))
    with pytest.raises(UserError, match="CUDA is not available"):
        convert(load_model("builtin:mnist-vit"), ConvertConfig(budget="5MB", device="cuda"))


# --------------------------------------------------------------------------------------------------
# architecture references (wasi_compress.architectures): one decision, one registry


def test_is_architecture_is_the_one_decision(tmp_path, monkeypatch):
    from wasi_compress.architectures import is_architecture

    assert is_architecture("timm:vit_tiny_patch16_224") and is_architecture(" builtin:mnist-vit ")
    assert is_architecture("pkg.mod:factory")
    assert not is_architecture("model.safetensors") and not is_architecture(str(tmp_path / "m.pt"))
    odd = tmp_path / "run:3.pt"  # an existing file with a colon in its name is a file
    odd.write_bytes(b"x")
    assert not is_architecture(str(odd))


def test_checkpoint_source_records_the_architecture_and_options():
    from wasi_compress.architectures import checkpoint_source

    assert checkpoint_source("timm:vit_tiny_patch16_224", num_classes=5, img_size=64) == {
        "arch": "timm:vit_tiny_patch16_224", "num_classes": 5, "img_size": 64}
    assert checkpoint_source("w.pt", arch=FACTORY) == {"arch": FACTORY, "num_classes": None, "img_size": None}
    assert checkpoint_source("w.pt") is None  # a pickled module names no architecture
    own = {"source": {"arch": "builtin:mnist-vit", "num_classes": 10, "img_size": None}}
    assert checkpoint_source("c.safetensors", metadata=own) == own["source"]
    assert checkpoint_source("c.safetensors", metadata=own, num_classes=3)["num_classes"] == 3
    assert own["source"]["num_classes"] == 10  # the metadata is not changed


def test_register_architecture_adds_a_builtin_name(monkeypatch):
    from wasi_compress import architectures

    monkeypatch.setattr(architectures, "_REGISTRY", dict(architectures.builtin_architectures()))

    @architectures.register_architecture("tiny-mlp", pretrained=lambda: nn.Linear(4, 2))
    def tiny(num_classes: int = 2):
        return nn.Linear(4, num_classes)

    assert isinstance(load_model("builtin:tiny-mlp").model, nn.Linear)
    bare = architectures.build_architecture("builtin:tiny-mlp", num_classes=3, pretrained=False)
    assert bare.out_features == 3
    with pytest.raises(UserError, match="unknown builtin model 'nope'; available: minilm, mnist-vit, tiny-mlp"):
        load_model("builtin:nope")
