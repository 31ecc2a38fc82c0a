"""The convert, checkpoint and pass tests' models under the MODEL names `convert_models:<factory>` (the
tests put this folder on sys.path). They are defined once, in tests/vit_models.py; see tests/models.py
for the list of every test model."""

from __future__ import annotations

from vit_models import hand_vit, structured_mlp, tiny_swin, tiny_vit

__all__ = ["hand_vit", "structured_mlp", "tiny_swin", "tiny_vit"]
