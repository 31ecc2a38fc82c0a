"""Models that ship inside the package (weights as safetensors, provenance beside them).

Each module registers its model as ``builtin:<name>`` with `wasi_compress.architectures.register_architecture`;
importing this package imports them all."""

from wasi_compress.builtin import mnist_vit  # noqa: F401  (registers builtin:mnist-vit)
from wasi_compress.builtin import minilm  # noqa: F401  (registers builtin:minilm: hf: on a packaged folder)
