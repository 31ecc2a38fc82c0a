"""TEMPORARY shim: the measurement code lives in `wasi_compress.measure`. Remove once nothing imports this.

Replacements: ``SavedActivations`` (the context manager) -> ``wasi_compress.measure.SavedActivationMeter``
(same constructor ``(model, watch)``, same ``per_module`` and ``total_bytes``); ``LiveTensorBytes`` and
``storage_bytes`` keep their names in ``wasi_compress.measure``."""

# TEMPORARY shim
from wasi_compress.measure import LiveTensorBytes, storage_bytes
from wasi_compress.measure import SavedActivationMeter as SavedActivations

__all__ = ["LiveTensorBytes", "SavedActivations", "storage_bytes"]
