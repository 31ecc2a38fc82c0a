"""Models that ship inside the package (weights as safetensors, provenance beside them)."""

from wasi_compress.builtin import mnist_vit

# name -> callable returning the model with its shipped weights
BUILTIN_MODELS = {"mnist-vit": mnist_vit.pretrained}
