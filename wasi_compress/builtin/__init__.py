"""Models that ship inside the package (weights as safetensors, provenance beside them)."""
