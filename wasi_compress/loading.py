"""Turn the MODEL argument of every command into an nn.Module, safely.

Accepted forms:
- ``timm:<name>``: any timm model, created with ``pretrained=False`` (nothing is downloaded);
- ``builtin:<name>``: a model shipped inside this package (``builtin:mnist-vit``);
- ``package.module:factory``: a Python callable returning an nn.Module, optionally with weights;
- a weights file (.safetensors, .pt, .pth, .bin) with ``arch`` naming one of the forms above, or a
  checkpoint written by ``convert``/``finetune``, which carries its own architecture in its metadata.

Torch files are read with ``weights_only=True``: a file holding a whole pickled module is refused unless
the user passes ``trust_pickle``, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress import _compat  # noqa: F401  (before timm)
from wasi_compress.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Top-level keys under which training scripts commonly nest a state dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")


@dataclass
class LoadedModel:
    model: nn.Module
    spec: str                       # the MODEL argument as given
    input_size: tuple[int, int, int]  # (C, H, W) the model expects
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None
    metadata: dict[str, Any] = field(default_factory=dict)  # wasi-compress checkpoint metadata, if any


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> LoadedModel:
    """Load a model from a MODEL argument (see the module docstring). Raises UserError on bad input."""
    spec = spec.strip()
    if not spec:
        raise UserError("MODEL is empty: give timm:<name>, builtin:mnist-vit, package.module:factory or a weights file")
    path = Path(spec)
    metadata: dict[str, Any] = {}
    if spec.startswith("timm:") or spec.startswith("builtin:") or (":" in spec and not path.exists()):
        if arch:
            raise UserError("--arch is for weights files; MODEL already names an architecture")
        model = _build_architecture(spec, num_classes=num_classes, img_size=img_size)
        if weights:
            _load_into(model, weights, trust_pickle=trust_pickle, what=spec)
    else:
        if weights:
            raise UserError("--weights is for MODEL given as an architecture; here MODEL is already a file")
        _check_file(path)
        metadata = wasi_checkpoint_metadata(path)
        if metadata:
            from wasi_compress.checkpoint import restore

            if arch:
                raise UserError(f"{path}: is a wasi-compress checkpoint that names its own architecture; drop --arch")
            model = restore(path, metadata, trust_pickle=trust_pickle)
        elif arch:
            model = _build_architecture(arch, num_classes=num_classes, img_size=img_size)
            _load_into(model, str(path), trust_pickle=trust_pickle, what=arch)
        else:
            model = _load_whole_module(path, trust_pickle=trust_pickle)
    model.eval()
    input_size, mean, std = _data_config(model, img_size)
    return LoadedModel(model, spec, input_size, mean, std, _num_classes(model), metadata)


# ---------------------------------------------------------------------------------------------------
# architectures


def _build_architecture(spec: str, *, num_classes: int | None, img_size: int | None) -> nn.Module:
    if spec.startswith("timm:"):
        return _timm_model(spec[len("timm:"):], num_classes=num_classes, img_size=img_size)
    if spec.startswith("builtin:"):
        return _builtin_model(spec[len("builtin:"):], num_classes=num_classes, img_size=img_size)
    return _factory_model(spec, num_classes=num_classes, img_size=img_size)


def _size_kwargs(num_classes: int | None, img_size: int | None) -> dict[str, Any]:
    """The --num-classes / --img-size options given, as constructor keyword arguments."""
    return {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}


def _timm_model(name: str, *, num_classes: int | None, img_size: int | None) -> nn.Module:
    import timm

    if not name:
        raise UserError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `python -c 'import timm; print(timm.list_models(\"vit*\"))'` lists names"
        raise UserError(f"unknown timm model {name!r}{hint}")
    kwargs = _size_kwargs(num_classes, img_size)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        if img_size is not None and "img_size" in str(exc):
            raise UserError(f"timm model {name!r} does not accept --img-size") from exc
        raise


def _builtin_model(name: str, *, num_classes: int | None, img_size: int | None) -> nn.Module:
    from wasi_compress.builtin import BUILTIN_MODELS

    if name not in BUILTIN_MODELS:
        raise UserError(f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}")
    if img_size is not None:
        raise UserError(f"builtin:{name} has a fixed input size; drop --img-size")
    model = BUILTIN_MODELS[name]()
    if num_classes is not None and num_classes != _num_classes(model):
        if not hasattr(model, "reset_classifier"):
            raise UserError(f"builtin:{name} cannot change its number of classes")
        model.reset_classifier(num_classes)
    return model


def _factory_model(spec: str, *, num_classes: int | None, img_size: int | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"cannot read MODEL {spec!r}: use timm:<name>, builtin:<name>, package.module:factory or a weights file")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"cannot import {module_name!r} for MODEL {spec!r}: {exc}; is it on PYTHONPATH?") from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UserError(f"{module_name} has no attribute {attr!r} (MODEL {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UserError(f"{spec} is not callable; MODEL must name a function or class returning an nn.Module")
    kwargs = _size_kwargs(num_classes, img_size)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        if kwargs:
            raise UserError(f"{spec} does not accept {', '.join('--' + k.replace('_', '-') for k in kwargs)}: {exc}") from exc
        raise
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


# ---------------------------------------------------------------------------------------------------
# weights files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; MODEL must be a weights file or timm:/builtin:/module:factory")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UserError(f"{path}: unknown weights format {path.suffix!r}; use {', '.join(WEIGHT_SUFFIXES)}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from exc


def wasi_checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The wasi-compress metadata of a safetensors checkpoint, or {} for any other file."""
    if path.suffix.lower() != ".safetensors":
        return {}
    import json

    meta = _safetensors_metadata(path)
    raw = meta.get("wasi_compress")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its wasi_compress metadata is not valid JSON; the file is damaged") from exc


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path}: not a valid safetensors file (truncated or damaged: {_short(exc)})") from exc


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (weights_only unless trusted)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        _safetensors_metadata(path)  # validates the header with a clear error
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a valid safetensors file (truncated or damaged: {_short(exc)})") from exc
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    state = _as_state_dict(obj)
    if state is None:
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return state


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about a raw pickle's protocol before refusing it: the error is the one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UserError(
                f"{path}: holds pickled Python objects beyond tensors (e.g. a whole module); loading it can run "
                "code, so it was not loaded. Pass --trust-pickle only if you trust its source, or save a state dict"
            ) from exc
        raise UserError(f"{path}: cannot unpickle ({_short(exc)})") from exc
    except Exception as exc:  # a damaged file fails anywhere in the unpickler: KeyError, IndexError, struct.error...
        raise UserError(f"{path}: not a readable torch file (truncated or damaged: {_short(exc)})") from exc


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in _NESTED_STATE_KEYS:
            if key in obj:
                nested = obj[key].state_dict() if isinstance(obj[key], nn.Module) else obj[key]
                found = _as_state_dict(nested)
                if found is not None:
                    return found
    return None


def _load_into(model: nn.Module, weights: str, *, trust_pickle: bool, what: str) -> None:
    state = read_state_dict(weights, trust_pickle=trust_pickle)
    load_state_dict_strict(model, state, source=f"{weights} (for {what})")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict with one clear line naming the first missing, unexpected or misshapen key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if misshapen:
            k = misshapen[0]
            parts.append(f"{len(misshapen)} of another shape (first: {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise UserError(f"{source}: the weights do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _load_whole_module(path: Path, *, trust_pickle: bool) -> nn.Module:
    if path.suffix.lower() == ".safetensors":
        raise UserError(f"{path}: a safetensors file holds only weights; give the architecture with --arch timm:<name> or --arch package.module:factory")
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    raise UserError(f"{path}: holds a state dict; give the architecture with --arch timm:<name> or --arch package.module:factory")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# ---------------------------------------------------------------------------------------------------
# input description


def _data_config(model: nn.Module, img_size: int | None) -> tuple[tuple[int, int, int], tuple, tuple]:
    """(C, H, W), mean, std: timm's data config where the model has one, else from its patch embedding."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        chans = getattr(getattr(patch_embed, "proj", None), "in_channels", None) or (input_size or (3,))[0]
        h, w = _pair(patch_embed.img_size)
        input_size = (chans, h, w)
    if input_size is None:
        input_size = getattr(model, "default_input_size", None) or (3, 224, 224)
    if img_size is not None:
        input_size = (input_size[0], img_size, img_size)
    c = int(input_size[0])
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406) if c == 3 else (0.5,) * c))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225) if c == 3 else (0.5,) * c))
    return (c, int(input_size[1]), int(input_size[2])), mean, std


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def resolve_device(device: str) -> torch.device:
    """The torch device named by a --device value, or a UserError naming what is wrong with it."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev
