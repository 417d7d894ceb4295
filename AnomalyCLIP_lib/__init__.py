"""AnomalyCLIP's vendored CLIP: ViT backbone with DPAM, deep text tokens, and the scoring path.

Typical use::

    import AnomalyCLIP_lib
    model, preprocess = AnomalyCLIP_lib.load("ViT-L/14@336px", device="cpu")
    image_embedding, patch_tokens = model.encode_image(images, [24], dpam_layer=20)
"""

from .errors import AnomalyCLIPError
from .factory import load, read_state_dict
from .model import CLIP, build_model
from .pretrained import available_models, download
from .tokenizer import tokenize

__all__ = [
    "AnomalyCLIPError",
    "CLIP",
    "available_models",
    "build_model",
    "download",
    "load",
    "read_state_dict",
    "tokenize",
]
