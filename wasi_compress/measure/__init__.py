"""Measurement: storage bytes, the saved-activations meter (by module, linear layer and op family), live tensor
bytes and the training-memory breakdown."""

from wasi_compress.measure.live import LiveTensorBytes
from wasi_compress.measure.saved import FAMILIES, SavedActivationMeter, SavedBytes, measure_saved_activations
from wasi_compress.measure.storage import storage_bytes
from wasi_compress.measure.train_memory import train_memory

__all__ = ["FAMILIES", "LiveTensorBytes", "SavedActivationMeter", "SavedBytes", "measure_saved_activations", "storage_bytes",
           "train_memory"]
