"""wasi-compress: Weight-Activation Subspace Iteration for vision transformers.

The transforms (``lowrank_``, ``prepare_training_``, ``to_inference_``, ``save``, ``load`` and their
configs) work on your own model in your own training loop; the jobs (``convert``, ``finetune``) are
what the command line runs. Names resolve lazily: importing the package imports no torch-heavy module."""

from wasi_compress import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"

_TRANSFORMS = ("ConfigError", "JactusConfig", "JactusPlan", "LowRankConfig", "LowRankPlan", "TrainingHandle", "WasiConfig",
               "apply_", "jactus_", "load", "lowrank_", "prepare_training_", "register_transform", "save", "to_inference_")
_JOBS = {"convert": "wasi_compress.convert", "ConvertConfig": "wasi_compress.convert",
         "ConvertResult": "wasi_compress.convert", "finetune": "wasi_compress.finetune",
         "FinetuneConfig": "wasi_compress.finetune", "FinetuneResult": "wasi_compress.finetune"}
__all__ = sorted(_TRANSFORMS + tuple(_JOBS))


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    import importlib

    if name in _TRANSFORMS:
        return getattr(importlib.import_module("wasi_compress.transforms"), name)
    if name in _JOBS:
        module = importlib.import_module(_JOBS[name])
        # `wasi_compress.convert` is a callable module: convert(model, config) works on it directly
        return module if name == "convert" else getattr(module, name)
    raise AttributeError(f"module 'wasi_compress' has no attribute {name!r}")
