"""The resume state (``OUT.resume.pt``): everything a run needs to continue to the same result as an
uninterrupted one (model, optimizer, RNG per process, Tucker compressors' ranks and warm-start factors,
the planned ranks). Plain tensors and containers only, read back with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.finetune.config import DEFAULT_MOMENTUM, FinetuneConfig
from wasi_compress.modules.asi import TuckerCompressor
from wasi_compress.modules.training import canonical_update
from wasi_compress.outputs import Outputs

RESUME_SUFFIX = ".resume.pt"
RESUME_VERSION = 1
# Settings that must match between a run and the run that resumes it (epochs may grow).
_RESUME_KEYS = ("model", "data", "method", "update", "threshold", "activation_threshold", "activation_budget",
                "batch_size", "lr", "optimizer", "schedule", "momentum", "weight_decay", "step_in_backward",
                "finetune_last", "memory_budget", "micro_batches", "recompute", "seed", "arch", "weights", "num_classes", "img_size", "seq_len")


def resume_path(output: str | os.PathLike) -> Path:
    return Path(str(output) + RESUME_SUFFIX)


def compressor_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in model.named_modules():
        c = getattr(m, "compressor", None)
        if isinstance(c, TuckerCompressor):
            out[name] = {"ranks": None if c.ranks is None else torch.tensor(c.ranks, dtype=torch.int64),
                         "factors": None if c.factors is None else [f.detach().clone().cpu() for f in c.factors]}
    return out


def load_compressor_state(model: nn.Module, state: dict[str, dict[str, Any]], device: str) -> None:
    for name, m in model.named_modules():
        c = getattr(m, "compressor", None)
        if isinstance(c, TuckerCompressor):
            if name not in state:
                raise UserError(f"the resume state has no compressor state for {name}; it was written by another setup")
            s = state[name]
            c.ranks = None if s["ranks"] is None else [int(v) for v in s["ranks"].tolist()]
            c.factors = None if s["factors"] is None else [f.to(device) for f in s["factors"]]


# Every key save_resume writes, with the type it must have (checked before any is used).
_STATE_SCHEMA: dict[str, tuple[type, ...]] = {
    "version": (int,), "config": (str,), "epoch": (int,), "model": (dict,), "optimizer": (dict,),
    "history": (list,), "step_times": (list,), "weight_ranks": (dict, list, type(None)),
    "activation_ranks": (dict, list, type(None)), "planning": (str,), "per_rank": (list,),
}


def check_state_schema(state: Any, path: Path) -> None:
    """One line naming the first key that is missing or of the wrong type (never a KeyError later)."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a resume state (a {type(state).__name__}, not a dictionary)")
    for key, types in _STATE_SCHEMA.items():
        if key not in state:
            raise UserError(f"{path}: not a complete resume state: the key {key!r} is missing")
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise UserError(f"{path}: resume state key {key!r} is a {type(value).__name__}, not a {names}")
    if not isinstance(_json_or_none(state["config"]), dict):
        raise UserError(f"{path}: resume state key 'config' is not a JSON object")
    if _json_or_none(state["planning"]) is _BAD:
        raise UserError(f"{path}: resume state key 'planning' is not JSON")
    if "levers" in state and (not isinstance(state["levers"], str) or _json_or_none(state["levers"]) is _BAD):
        raise UserError(f"{path}: resume state key 'levers' is not JSON text")
    if state["epoch"] < 0 or not all(isinstance(r, dict) for r in state["per_rank"]):
        raise UserError(f"{path}: resume state key {'epoch' if state['epoch'] < 0 else 'per_rank'!r} is malformed")


_BAD = object()


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _BAD


def check_resume(config: FinetuneConfig, state: dict[str, Any], world: int, path: Path) -> None:
    if not isinstance(state, dict) or state.get("version") != RESUME_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise UserError(f"{path}: resume state version {version!r} is not one this version reads")
    check_state_schema(state, path)
    # a setting added after the state was written was at its default then (step_in_backward's was off)
    saved = {**FinetuneConfig(model=config.model, data=config.data).to_dict(), "step_in_backward": False,
             **json.loads(state["config"])}
    saved["update"] = canonical_update(saved["update"])  # a state written before the rename
    now = config.to_dict()
    if saved.get("threshold") is None:  # written without one: the default for this model, as this run resolves it
        saved["threshold"] = now.get("threshold")
    keys = _RESUME_KEYS + (("epochs",) if config.schedule == "cosine" else ())
    for key in keys:
        if _resolved(saved, key, world) != _resolved(now, key, world):
            raise UserError(f"{path}: was written with {key}={saved.get(key)!r}, but this run has {key}={now.get(key)!r}; "
                            "resume with the same settings (with --schedule constant, --epochs may grow)")
    if len(state["per_rank"]) != world:
        raise UserError(f"{path}: was written by {len(state['per_rank'])} processes; resume with the same number (now {world})")


def _resolved(settings: dict[str, Any], key: str, world: int) -> Any:
    """A setting as the run used it: momentum and step_in_backward may be None ("the default")."""
    value = settings.get(key)
    if value is None and key == "momentum":
        return DEFAULT_MOMENTUM if settings.get("optimizer") == "sgd" else 0.0
    if value is None and key == "step_in_backward":
        return settings.get("micro_batches", 1) == 1 and settings.get("memory_budget") is None and world <= 1
    return value


def save_resume(path: Path, outputs: Outputs, *, config: FinetuneConfig, epoch: int, model: nn.Module, optimizer, history, step_times,
                 weight_ranks, activation_ranks, planning, per_rank: list[dict[str, Any]],
                 levers: dict[str, Any] | None = None) -> None:
    state = {
        "version": RESUME_VERSION,
        "config": config.to_json(),
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": history,
        "step_times": list(step_times),
        "weight_ranks": weight_ranks,
        "activation_ranks": activation_ranks,
        "planning": json.dumps(planning),
        "per_rank": per_rank,
        "levers": json.dumps(levers),  # the memory levers in use (planned under --memory-budget): not re-planned
    }
    outputs.stage(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist (it is written after every epoch of a run with -o)")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about a raw pickle's protocol before refusing it: the error is the one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # objects beyond tensors and containers: never unpickled
        raise UserError(f"{path}: not a readable resume state: it holds pickled Python objects, which finetune never "
                        "writes and which could run code, so it was not loaded; delete it and run without --resume") from exc
    except Exception as exc:  # damaged or foreign file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a readable resume state ({type(exc).__name__}: {first})") from exc
    if isinstance(state, dict) and state.get("version") == RESUME_VERSION:
        check_state_schema(state, path)
    elif not isinstance(state, dict):
        raise UserError(f"{path}: not a resume state (a {type(state).__name__}, not a dictionary)")
    return state
