"""TEMPORARY shim: the measurement code lives in `wasi_compress.measure`. Remove once nothing imports this.

Replacements: ``SavedActivations`` (the result) -> ``wasi_compress.measure.SavedBytes``; ``tensor_bytes`` ->
``wasi_compress.measure.storage_bytes``; ``measure_saved_activations`` and ``train_memory`` keep their names."""

# TEMPORARY shim
from wasi_compress.measure import SavedBytes as SavedActivations
from wasi_compress.measure import measure_saved_activations, train_memory
from wasi_compress.measure import storage_bytes as tensor_bytes

__all__ = ["SavedActivations", "measure_saved_activations", "tensor_bytes", "train_memory"]
