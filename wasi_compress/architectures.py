"""Architecture references: the MODEL strings that name a model to build rather than a file.

- ``timm:<name>``: any timm model, created with ``pretrained=False`` (nothing is downloaded);
- ``builtin:<name>``: a model shipped inside this package, registered with `register_architecture`
  (timm-style: the module that defines the model registers it, see builtin/mnist_vit.py);
- ``package.module:factory``: a Python callable returning an nn.Module.

`is_architecture` is the one place that tells such a string from a weights file. A leaf module: it
knows nothing about weights files or checkpoints."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from wasi_compress import _compat  # noqa: F401  (before timm)
from wasi_compress.errors import UserError
from wasi_compress.inputs import num_classes_of

# Packages whose modules register builtin architectures; imported by name on the first builtin lookup
# (the registering modules import this one, so a static import here would be a cycle).
_BUILTIN_PACKAGES = ("wasi_compress.builtin",)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[..., nn.Module]                  # untrained; accepts num_classes=
    pretrained: Callable[[], nn.Module] | None = None  # with the shipped weights
    fixed_input_size: bool = True


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(name: str, *, pretrained: Callable[[], nn.Module] | None = None,
                          fixed_input_size: bool = True) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `build` (the untrained architecture) as ``builtin:<name>``."""
    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = Architecture(name, build, pretrained, fixed_input_size)
        return build

    return decorate


def builtin_architectures() -> dict[str, Architecture]:
    """name -> registered builtin architecture."""
    for package in _BUILTIN_PACKAGES:
        importlib.import_module(package)
    return dict(_REGISTRY)


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# the kinds that import nothing outside timm, transformers (an allow-list of classes) and this package
_TRUSTED_PREFIXES = ("timm:", "builtin:", "hf:")


def is_architecture(spec: str) -> bool:
    """Whether a MODEL string names an architecture rather than a file. A path-looking string (a path
    separator, a weights suffix, or an existing file) is a path, never an import: ``models:v2.safetensors``
    is a missing file, not the module ``models``."""
    spec = spec.strip()
    if spec.startswith(_TRUSTED_PREFIXES):
        return True
    looks_like_path = "/" in spec or "\\" in spec or spec.lower().endswith(_WEIGHT_SUFFIXES)
    return ":" in spec and not looks_like_path and not Path(spec).exists()


def runs_code(arch: str) -> bool:
    """Whether building `arch` imports and calls code named by the string (a package.module:factory)."""
    return not arch.strip().startswith(_TRUSTED_PREFIXES)


def build_architecture(spec: str, *, num_classes: int | None = None, img_size: int | None = None,
                       pretrained: bool = True, seq_len: int | None = None, trust_pickle: bool = False) -> nn.Module:
    """The model an architecture reference names. ``pretrained``: builtin models come with their shipped
    weights (False: the bare architecture, for a checkpoint to fill); timm models never download any.
    ``seq_len``: the token length of a text model's example input (hf: text models)."""
    if spec.strip() == "builtin:minilm":  # a packaged hf: folder (builtin/minilm.py), so --seq-len applies
        from wasi_compress.hf import minilm_spec

        spec = minilm_spec()
    if spec.startswith("hf:"):
        from wasi_compress.hf import load_hf

        return load_hf(spec, num_classes=num_classes, img_size=img_size, seq_len=seq_len, trust_pickle=trust_pickle,
                       pretrained=pretrained)
    if seq_len is not None:
        raise UserError("--seq-len is for text models (hf:); drop it")
    if spec.startswith("timm:"):
        return _timm_model(spec[len("timm:"):], num_classes=num_classes, img_size=img_size)
    if spec.startswith("builtin:"):
        return _builtin_model(spec[len("builtin:"):], num_classes=num_classes, img_size=img_size, pretrained=pretrained)
    return _factory_model(spec, num_classes=num_classes, img_size=img_size)


def checkpoint_source(model: str, *, arch: str | None = None, num_classes: int | None = None,
                      img_size: int | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``source`` a checkpoint records for a MODEL argument and its loading options:
    ``{"arch", "num_classes", "img_size"}``, or None when MODEL is a file that names no architecture
    (a pickled module). ``metadata``: MODEL's own wasi checkpoint metadata, whose source wins;
    ``num_classes``, when given, replaces the recorded one (a new classifier)."""
    if metadata and metadata.get("source"):
        source = dict(metadata["source"])
    elif model.strip().startswith("hf:") and not arch:
        return None  # the loaded model records its own (class and config: hf.HFModel.hf_source)
    elif arch:
        source = {"arch": arch, "num_classes": None, "img_size": img_size}
    elif is_architecture(model):
        source = {"arch": model.strip(), "num_classes": None, "img_size": img_size}
    else:
        return None
    if num_classes is not None:
        source["num_classes"] = num_classes
    return source


def _size_kwargs(num_classes: int | None, img_size: int | None) -> dict[str, Any]:
    """The --num-classes / --img-size options given, as constructor keyword arguments."""
    return {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}


def _timm_model(name: str, *, num_classes: int | None, img_size: int | None) -> nn.Module:
    import timm

    if not name:
        raise UserError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    if not timm.is_model(name):  # (listing every model only on a miss: it takes seconds)
        known = timm.list_models()
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


def _builtin_model(name: str, *, num_classes: int | None, img_size: int | None, pretrained: bool) -> nn.Module:
    known = builtin_architectures()
    if name not in known:
        raise UserError(f"unknown builtin model {name!r}; available: {', '.join(sorted(known))}")
    entry = known[name]
    if img_size is not None and entry.fixed_input_size:
        raise UserError(f"builtin:{name} has a fixed input size; drop --img-size")
    if not pretrained or entry.pretrained is None:
        return entry.build(**_size_kwargs(num_classes, None))
    model = entry.pretrained()
    if num_classes is not None and num_classes != num_classes_of(model):
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
