"""Reading weights files safely: safetensors, or torch files with ``weights_only=True``.

A torch file holding a whole pickled module is refused unless the caller passes ``trust_pickle``,
because unpickling can run arbitrary code. A leaf module: it reads tensors and metadata, and knows
nothing about architectures or how a checkpoint is rebuilt."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# The safetensors metadata key under which a wasi-compress checkpoint keeps its JSON description.
METADATA_KEY = "wasi_compress"
# Top-level keys under which training scripts commonly nest a state dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")


def check_file(path: Path) -> None:
    """A UserError naming what is wrong unless `path` is a readable file with a weights suffix."""
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


_check_file = check_file  # the name loading.py used


def wasi_checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The wasi-compress metadata of a safetensors checkpoint, or {} for any other file."""
    if path.suffix.lower() != ".safetensors":
        return {}
    raw = safetensors_metadata(path).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its wasi_compress metadata is not valid JSON; the file is damaged") from exc
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: its wasi_compress metadata is a JSON {type(metadata).__name__}, not an object; "
                        "the file is damaged")
    return metadata


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (a UserError if the header is damaged)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path}: not a valid safetensors file (truncated or damaged: {_short(exc)})") from exc


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (weights_only unless trusted)."""
    path = Path(path)
    check_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        safetensors_metadata(path)  # validates the header with a clear error
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a valid safetensors file (truncated or damaged: {_short(exc)})") from exc
    obj = torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    state = _as_state_dict(obj)
    if state is None:
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return state


def torch_load(path: Path, *, trust_pickle: bool) -> Any:
    """torch.load on CPU, ``weights_only`` unless trusted; every failure is one UserError line."""
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


def load_whole_module(path: Path, *, trust_pickle: bool) -> nn.Module:
    """A torch file holding a whole pickled module (only with ``trust_pickle``)."""
    if path.suffix.lower() == ".safetensors":
        raise UserError(f"{path}: a safetensors file holds only weights; give the architecture with --arch timm:<name> or --arch package.module:factory")
    obj = torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return obj
    raise UserError(f"{path}: holds a state dict; give the architecture with --arch timm:<name> or --arch package.module:factory")


def load_weights_into(model: nn.Module, weights: str, *, trust_pickle: bool, what: str) -> None:
    """Read a weights file and load it strictly into `model` (`what` names the architecture in errors)."""
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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
