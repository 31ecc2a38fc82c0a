"""torchvision's vision transformers as MODEL factories (``tv_models:vit_b_16``, ``tv_models:swin_t``),
untrained; ``wasi_compress`` first (its torchvision shim)."""

import wasi_compress  # noqa: F401  (before torchvision)
import torchvision


def vit_b_16(num_classes: int = 1000, img_size: int = 224):
    return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=img_size)


def swin_t(num_classes: int = 1000):
    return torchvision.models.swin_t(weights=None, num_classes=num_classes)
