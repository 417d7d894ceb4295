"""AnomalyCLIP's vendored CLIP: ViT backbone with DPAM, deep text tokens, and the scoring path.

Typical use::

    import AnomalyCLIP_lib
    model, preprocess = AnomalyCLIP_lib.load("ViT-L/14@336px", device="cpu")
    image_embedding, patch_tokens = model.encode_image(images, [24], dpam_layer=20)

Names are imported on first use, so light modules (``AnomalyCLIP_lib.errors``) load without torch.
"""

from importlib import import_module

__version__ = "1.0.0"

_EXPORTS = {
    "AnomalyCLIPError": "errors",
    "CLIP": "model",
    "build_model": "model",
    "load": "factory",
    "read_state_dict": "factory",
    "available_models": "pretrained",
    "download": "pretrained",
    "tokenize": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
