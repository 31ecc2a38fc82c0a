"""torchvision's vision transformers as MODEL factories (``tv_models:vit_b_16``, ``tv_models:swin_t``),
untrained; ``wasi_compress`` first (its torchvision shim). ``vit_b_16_shallow``: vit_b_16's widths at 2
layers (torchvision's own VisionTransformer class), to keep the sweep short."""

import wasi_compress  # noqa: F401  (before torchvision)
import torchvision
from torchvision.models.vision_transformer import VisionTransformer


def vit_b_16(num_classes: int = 1000, img_size: int = 224):
    return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=img_size)


def vit_b_16_shallow(num_classes: int = 1000, img_size: int = 224):
    return VisionTransformer(image_size=img_size, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768,
                             mlp_dim=3072, num_classes=num_classes)


def swin_t(num_classes: int = 1000):
    return torchvision.models.swin_t(weights=None, num_classes=num_classes)
