"""Turn the MODEL argument of every command into an nn.Module, safely.

Accepted forms:
- ``timm:<name>``: any timm model, created with ``pretrained=False`` (nothing is downloaded);
- ``builtin:<name>``: a model shipped inside this package (``builtin:mnist-vit``);
- ``package.module:factory``: a Python callable returning an nn.Module, optionally with weights;
- a weights file (.safetensors, .pt, .pth, .bin) with ``arch`` naming one of the forms above, or a
  checkpoint written by ``convert``/``finetune``, which carries its own architecture in its metadata.

Torch files are read with ``weights_only=True``: a file holding a whole pickled module is refused unless
the user passes ``trust_pickle``, because unpickling can run arbitrary code.

This module only dispatches: architectures.py builds models, weights.py reads files, checkpoint.py
rebuilds checkpoints and inputs.py describes a model's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress import _compat  # noqa: F401  (before timm)
from wasi_compress.architectures import build_architecture, is_architecture
from wasi_compress.checkpoint import restore
from wasi_compress.errors import UserError
from wasi_compress.inputs import data_config, num_classes_of
from wasi_compress.weights import check_file, load_weights_into, load_whole_module, wasi_checkpoint_metadata



@dataclass
class LoadedModel:
    model: nn.Module
    spec: str                       # the MODEL argument as given
    input_size: tuple[int, ...]     # (C, H, W) the model expects; (seq_len,) for a text model
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
    trust_code: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
    seq_len: int | None = None,
) -> LoadedModel:
    """Load a model from a MODEL argument (see the module docstring). Raises UserError on bad input.

    ``trust_code``: let a checkpoint whose metadata names a ``package.module:factory`` build it (the
    file chose that code); giving the same factory as ``arch`` counts as trusting it too. A MODEL or
    ``arch`` the caller passes is the caller's own choice and needs no flag."""
    spec = spec.strip()
    if not spec:
        raise UserError("MODEL is empty: give timm:<name>, builtin:mnist-vit, hf:<dir>, package.module:factory or a weights file")
    metadata: dict[str, Any] = {}
    if is_architecture(spec):
        if arch:
            raise UserError("--arch is for weights files; MODEL already names an architecture")
        model = build_architecture(spec, num_classes=num_classes, img_size=img_size, seq_len=seq_len,
                                   trust_pickle=trust_pickle)
        if weights:
            load_weights_into(model, weights, trust_pickle=trust_pickle, what=spec)
    else:
        if seq_len is not None:
            raise UserError("--seq-len is for text models given as hf: or builtin:minilm; drop it")
        model, metadata = _load_file(Path(spec), arch=arch, weights=weights, trust_pickle=trust_pickle,
                                     trust_code=trust_code, num_classes=num_classes, img_size=img_size)
    model.eval()
    input_size, mean, std = data_config(model, img_size)
    return LoadedModel(model, spec, input_size, mean, std, num_classes_of(model), metadata)


def _load_file(path: Path, *, arch: str | None, weights: str | None, trust_pickle: bool, trust_code: bool,
               num_classes: int | None, img_size: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """MODEL given as a file: a wasi checkpoint, weights for --arch, or (trusted) a pickled module."""
    if weights:
        raise UserError("--weights is for MODEL given as an architecture; here MODEL is already a file")
    check_file(path)
    metadata = wasi_checkpoint_metadata(path)
    if metadata:
        source = metadata.get("source")
        named = source.get("arch") if isinstance(source, dict) else None
        if arch and arch != named:
            raise UserError(f"{path}: is a wasi-compress checkpoint that names its own architecture; drop --arch")
        return restore(path, metadata, trust_pickle=trust_pickle, trust_code=trust_code or bool(arch)), metadata
    if arch:
        model = build_architecture(arch, num_classes=num_classes, img_size=img_size)
        load_weights_into(model, str(path), trust_pickle=trust_pickle, what=arch)
        return model, metadata
    return load_whole_module(path, trust_pickle=trust_pickle), metadata


def resolve_device(device: str) -> torch.device:
    """The torch device named by a --device value, or a UserError naming what is wrong with it."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev
