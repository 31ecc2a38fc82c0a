"""wasi-compress: Weight-Activation Subspace Iteration for vision transformers."""

from wasi_compress import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model: a checkpoint written by `convert`/`finetune` (it names its own architecture), or any
    MODEL argument `wasi_compress.loading.load_model` accepts. Returns the nn.Module (eval mode)."""
    from wasi_compress.loading import load_model

    return load_model(str(path), **kwargs).model


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name in ("convert", "ConvertConfig", "ConvertResult"):
        import importlib

        module = importlib.import_module("wasi_compress.convert")  # a callable module: convert(model, config)
        return module if name == "convert" else getattr(module, name)
    raise AttributeError(f"module 'wasi_compress' has no attribute {name!r}")
