"""Image processing as DeepSeek-OCR does it: decode, EXIF transpose, RGB, pad (or stretch) to a square, normalise.

Every failure a user's file can cause — truncated bytes, an unknown format, a decompression bomb — surfaces as
`ImageError` with a message saying what is wrong, never as an exception from deep inside PIL.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

PAD_COLOR = (127, 127, 127)   # int(0.5 * 255): the normalisation mean, so padding is ~0 after normalising
MEAN = STD = 0.5


class ImageError(ValueError):
    """An image could not be decoded or converted; the message says why, `reason` names the kind for counters."""

    def __init__(self, message: str, reason: str = "bad_image"):
        super().__init__(message)
        self.reason = reason


def load_image(source: bytes | str | Path) -> Image.Image:
    """Decode fully (so truncation is caught here), apply EXIF orientation, return an RGB image."""
    what = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat any excess as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what}: larger than Pillow's pixel limit ({Image.MAX_IMAGE_PIXELS} pixels): {e}",
                         reason="image_too_large") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:   # truncated or corrupt data; PIL raises all three
        raise ImageError(f"{what}: cannot decode ({e})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16/32-bit greys are rescaled (not clipped), transparency goes on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")   # palette images may carry transparency
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int, resize: str) -> Image.Image:
    """`pad`: scale to fit, keep the aspect, centre on grey (Base/Large); `resize`: stretch (Tiny/Small)."""
    if resize == "pad":
        return ImageOps.pad(image, (size, size), color=PAD_COLOR)
    if resize == "resize":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    raise ValueError(f"image_resize: {resize!r} is not 'pad' or 'resize'")


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: a quarter of fp32's size, so loaders and host-to-device copies move 4x less."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] as ToTensor + Normalize(mean 0.5, std 0.5); run it on the device."""
    return (pixels.to(dtype) / 255.0 - MEAN) / STD


def load_pixels(source: bytes | str | Path | Image.Image, size: int, resize: str = "pad") -> torch.Tensor:
    """Decode (if needed) and fit one image: the (3, size, size) uint8 tensor a batch carries."""
    image = to_rgb(source) if isinstance(source, Image.Image) else load_image(source)
    return to_pixels(fit_square(image, size, resize))


def process_image(source: bytes | str | Path | Image.Image, size: int, resize: str = "pad") -> torch.Tensor:
    """The (3, size, size) float tensor the encoder takes."""
    return normalize(load_pixels(source, size, resize))
