"""Image and mask preprocessing (method §2), done on the PIL side exactly like the original.

Images are resized in the mode they are stored in (no conversion before the resize): PIL's
own bicubic filter to S×S ignoring the aspect ratio, a center crop (a no-op), ``convert('RGB')``,
``ToTensor`` and the OpenAI CLIP normalisation. Masks are binarised at ``> 0`` on their luma,
resized bilinearly as a 0/255 ``'L'`` image and divided by 255; :func:`binarize_mask` then
applies the ``> 0.5`` threshold. A tensor-side resize differs by up to ~1/255 per pixel, so none
is used.

File reading (:func:`load_image`, :func:`load_mask`) adds what the original lacks:

* Any unreadable file raises :class:`~AnomalyCLIP_lib.errors.AnomalyCLIPError` naming it.
* 8-bit files (RGB, L, RGBA, LA, P, 1, CMYK, JPEG, BMP, ...) are returned untouched, so the
  tensors are bit-identical to the original's.
* High-bit-depth single-channel files (16-bit PNG opened as ``'I;16'``, 32-bit ``'I'`` and float
  ``'F'`` TIFFs, common for medical images) are stretched per image, linearly, from their own
  minimum..maximum to 0..255 and returned as ``'L'``. The original would clip every value above
  255 to white. A fixed ``/257`` would keep 12-bit CT/MR data (values up to 4095, stored in a
  16-bit container) nearly black; the per-image stretch is what a viewer's auto-window shows.
  A constant image becomes all zeros. For masks, such files are binarised on the raw values
  (``> 0``), never stretched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms

from .images import load_image, load_mask  # noqa: F401  (re-exported: the readers live in images.py)

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)



def _convert_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The image preprocessing of method §2.

    Args:
        image_size: S, the side of the square output.

    Returns:
        A picklable callable mapping a PIL image (any mode, any size) to a float32 tensor
        (3, S, S), normalised with the OpenAI CLIP mean and std.
    """
    size = (image_size, image_size)
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            _convert_to_rgb,
            transforms.ToTensor(),
            transforms.Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD),
        ]
    )


def mask_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The mask preprocessing of method §2, before the threshold.

    Args:
        image_size: S, the side of the square output.

    Returns:
        A picklable callable mapping a 0/255 ``'L'`` PIL mask (see :func:`load_mask`) to a
        float32 tensor (1, S, S) in [0, 1]: the bilinear (antialiased) resize of the binary
        mask. Apply :func:`binarize_mask` to get the 0/1 mask the metrics use.
    """
    size = (image_size, image_size)
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ]
    )


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Threshold a resized mask: ``> 0.5`` gives 1.0, anything else 0.0 (same dtype as input)."""
    return (mask > 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32)
