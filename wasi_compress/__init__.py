"""wasi-compress: Weight-Activation Subspace Iteration for vision transformers."""

from wasi_compress import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
