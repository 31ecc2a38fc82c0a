"""The Python API for a model of your own: transforms that change an nn.Module in place.

    plan = lowrank_(model, LowRankConfig(budget="50MB", objective="data"), example=x, calib=batches)
    handle = prepare_training_(model, WasiConfig(method="wasi"), example=x)
    plan = jactus_(model, JactusConfig(retain=0.8), calib=[(x, y), ...])   # compress + adapt (only cores train)
    handle.attach(optimizer)          # then train in your own loop
    to_inference_(model)
    save(model, "m.safetensors"); model = load("m.safetensors")

One rule for in place versus copy: transforms (names ending in ``_``) change the model you pass and
return what they decided; the analysis and conversion jobs (`analyze`, `convert`) never change their
input; `finetune` trains the model it loads (a LoadedModel passed to it is trained in place). A model
whose functional linears (F.linear on raw parameters) are rewritten can only change in its traced
graph: then the returned ``.model`` is that GraphModule, so always continue with ``.model``.

`apply_` dispatches on the config's type through a registry (torchao's ``quantize_`` pattern);
`register_transform` adds a handler for a new config type."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from wasi_compress.transforms.config import ConfigError, LowRankConfig, TransformConfig, WasiConfig
from wasi_compress.transforms.jactus import JactusConfig, JactusPlan, jactus_
from wasi_compress.transforms.lowrank import LowRankPlan, lowrank_
from wasi_compress.transforms.persist import load, save
from wasi_compress.transforms.training import TrainingHandle, prepare_training_, to_inference_

__all__ = ["ConfigError", "JactusConfig", "JactusPlan", "LowRankConfig", "LowRankPlan", "TrainingHandle", "TransformConfig", "WasiConfig", "apply_",
           "jactus_", "load", "lowrank_", "prepare_training_", "register_transform", "save", "to_inference_"]

_HANDLERS: dict[type, Callable[..., Any]] = {}


def register_transform(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``handler(model, config, **kwargs)`` applies configs of ``config_type``."""
    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def apply_(model: nn.Module, config: TransformConfig, **kwargs: Any) -> Any:
    """Apply the transform registered for ``type(config)`` to `model`, in place."""
    handler = next((_HANDLERS[t] for t in type(config).__mro__ if t in _HANDLERS), None)
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise TypeError(f"no transform is registered for {type(config).__name__}; known: {known}")
    return handler(model, config, **kwargs)


register_transform(LowRankConfig)(lowrank_)
register_transform(WasiConfig)(prepare_training_)
register_transform(JactusConfig)(jactus_)
