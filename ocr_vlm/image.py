"""Image processing as DeepSeek-OCR does it: decode, EXIF transpose, RGB, pad (or stretch) to a square, normalise;
in Gundam mode also cut the stretched page into tiles (`load_views`).

    python -m ocr_vlm.image layout --mode=gundam [--max_crops=N] [--preset=d20] 2480x3508 [...]
        -> per size: `WIDTHxHEIGHT tiles W_TxH_T embeddings N`, what the page costs in the sequence

The resize is DeepSeek-OCR's PIL bicubic (`ImageOps.pad`, `Image.resize`); `fit_square` keeps that path as the
definition. `load_pixels` runs the same filter through torch's antialiased uint8 kernel (`fit_square_pixels`), 3x
faster than PIL's on one core; it differs by rounding only, at most 2 levels on a few values in ten thousand.

Every failure a user's file can cause — truncated bytes, an unknown format, a decompression bomb — surfaces as
`Rejected` with a message saying what is wrong, never as an exception from deep inside PIL.
"""

from __future__ import annotations

import argparse
import io
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyspng
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ocr_vlm import config
from ocr_vlm.config import VLMConfig
from ocr_vlm.rejected import Rejected

PAD_COLOR = (127, 127, 127)   # int(0.5 * 255): the model's normalisation mean, so padding is ~0 after normalising
# The image formats a shard stores as supplied (Pillow's format -> member extension); the writer converts any other.
STORED_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
IMAGE_MEMBERS = (*STORED_FORMATS.values(), "jpeg")   # what the loader reads ("jpeg": shards written by other tools)


@contextmanager
def decode_errors(what: str) -> Iterator[None]:
    """Turn whatever decoding a user's file raises into a `Rejected` naming `what`."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat any excess as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("image_too_large",
                       f"{what}: larger than Pillow's pixel limit ({Image.MAX_IMAGE_PIXELS} pixels): {e}") from None
    except UnidentifiedImageError:
        raise Rejected("bad_image", f"{what}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, RuntimeError) as e:   # truncated or corrupt data: PIL raises the first
        raise Rejected("bad_image", f"{what}: cannot decode ({e})") from None   # three, pyspng RuntimeError


def describe(source: bytes | str | Path) -> str:
    return "image bytes" if isinstance(source, bytes) else str(source)


def load_image(source: bytes | str | Path) -> Image.Image:
    """Decode with Pillow, apply EXIF orientation, return an RGB image."""
    with decode_errors(describe(source)):
        return decoded(Image.open(io.BytesIO(source) if isinstance(source, bytes) else source))


def decoded(image: Image.Image) -> Image.Image:
    """An opened image decoded fully (so truncation is caught here), EXIF-rotated, in RGB."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)   # without in_place an unrotated page is copied
    return to_rgb(image)


def load_array(source: bytes | str | Path) -> np.ndarray:
    """`load_image`'s pixels as (H, W, 3) uint8. Plain PNGs (`plain_png`) are decoded by libspng (pyspng) instead of
    Pillow: identical pixels, ~1.2x faster, and no PIL image to copy out of."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with decode_errors(describe(source)):
        image = Image.open(io.BytesIO(data))   # reads the header, up to the pixel data; refuses a bomb by its size
        if not plain_png(image, data):
            return np.asarray(decoded(image))
        pixels = pyspng.load(data)
        return pixels if pixels.ndim == 3 and pixels.shape[2] == 3 else np.asarray(to_rgb(Image.fromarray(pixels)))


def plain_png(header: Image.Image, data: bytes) -> bool:
    """A PNG whose pyspng decode equals Pillow's: 8 bits per sample (data[24] is IHDR's bit depth; other depths decode
    to other arrays), grey, RGB, RGBA or palette (pyspng expands it to RGB), no tRNS transparency (pyspng drops it) and
    no EXIF orientation (an eXIf chunk may follow the pixel data, so the bytes are searched; a chance match in the
    compressed data only costs the fast path)."""
    return (header.format == "PNG" and data[24] == 8 and header.mode in ("L", "RGB", "RGBA", "P")
            and "transparency" not in header.info and b"eXIf" not in data)


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
    return image if image.mode == "RGB" else image.convert("RGB")   # convert() would copy an RGB image


def fit_square(image: Image.Image, size: int, resize: str) -> Image.Image:
    """The reference: `pad` scales to fit, keeps the aspect, centres on grey (Base/Large); `resize` stretches
    (Tiny/Small). Both are PIL's bicubic, as DeepSeek-OCR preprocesses."""
    if resize == "pad":
        return ImageOps.pad(image, (size, size), color=PAD_COLOR)
    if resize == "resize":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    raise unknown_resize(resize)


def unknown_resize(resize: str) -> ValueError:
    return ValueError(f"image_resize: {resize!r} is not 'pad' or 'resize'")


def fit_square_pixels(pixels: torch.Tensor, size: int, resize: str) -> torch.Tensor:
    """`fit_square` on (3, H, W) uint8 pixels, computed by torch: the same modes, sizes and placement."""
    left, top, width, height = placement(pixels.shape[2], pixels.shape[1], size, resize)
    if resize == "resize":
        return bicubic(pixels, size, size)
    # Planar like bicubic()'s output, so pasting copies whole rows (into (H, W, 3) it would transpose, ~3 ms).
    canvas = torch.tensor(PAD_COLOR, dtype=torch.uint8)[:, None, None].expand(3, size, size).contiguous()
    if width and height:                      # ImageOps.pad leaves a page thinner than half a pixel out; so do we
        canvas[:, top:top + height, left:left + width] = bicubic(pixels, height, width)
    return canvas


def placement(width: int, height: int, size: int, resize: str) -> tuple[int, int, int, int]:
    """Where `fit_square` puts a width x height page in its size x size square: (left, top, width, height)."""
    if resize == "pad":
        w, h = contained_size(width, height, size)
        return round((size - w) / 2), round((size - h) / 2), w, h   # ImageOps.pad's centring
    if resize == "resize":
        return 0, 0, size, size
    raise unknown_resize(resize)


def contained_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) ImageOps.contain scales to inside a size x size square, rounded as it rounds."""
    if width > height:
        return size, round(height / width * size)
    if width < height:
        return round(width / height * size), size
    return size, size


def bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's bicubic resize of (3, H, W) uint8 pixels: torch's antialiased bicubic is the same filter (Keys, a = -0.5,
    widened by the scale when shrinking), so results differ only by rounding (tests/test_image.py pins how much).
    Its fast uint8 kernel reads channels-last memory (what `pixels_view` gives) ~25% faster than planar; it returns
    planar."""
    return F.interpolate(pixels[None], size=(height, width), mode="bicubic", antialias=True)[0]


def pixels_view(pixels: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 over (H, W, 3) memory, to be read, not kept: no writable copy (`to_pixels` makes one, 4 MB for
    a 1400 px page, 5-10% of the fast path's time); `np.asarray` of a PIL image is read-only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pixels).permute(2, 0, 1)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8: a quarter of fp32's size, so loaders and host-to-device copies move 4x less."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_pixels(source: bytes | str | Path | Image.Image, size: int, resize: str = "pad",
                reference: bool = False) -> torch.Tensor:
    """Decode (if needed) and fit one image: the (3, size, size) uint8 tensor a batch carries. `reference` resizes
    with PIL (`fit_square`), the definition the fast default is tested against."""
    if reference:
        image = to_rgb(source) if isinstance(source, Image.Image) else load_image(source)
        return to_pixels(fit_square(image, size, resize))
    return fit_square_pixels(pixels_view(rgb_array(source)), size, resize)   # a new tensor: the view does not escape


def rgb_array(source: bytes | str | Path | Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a file or bytes (`load_array`'s fast path for plain PNGs) or of an opened image."""
    return np.asarray(to_rgb(source)) if isinstance(source, Image.Image) else load_array(source)


# ----------------------------------------------------------------------------------------------------------------
# Gundam: a global view plus tiles of the page (reference/deepencoder.md §1.6, InternVL's dynamic_preprocess).

class Views(NamedTuple):
    """What one image becomes: the global view (3, S, S), its tiles (n, 3, t, t) row-major, and the tile grid
    (w_t, h_t); (1, 1) means no tiles (every fixed mode, and Gundam pages within one tile). `size` is the source
    image's (width, height)."""
    global_view: torch.Tensor
    tiles: torch.Tensor
    grid: tuple[int, int]
    size: tuple[int, int]


def tile_grid(width: int, height: int, cfg: VLMConfig) -> tuple[int, int]:
    """The (w_t, h_t) tile grid of a width x height page: (1, 1) when both sides fit one tile, else the candidate
    whose aspect w_t/h_t is closest to the page's; on a tie the later (larger) grid when the page's area exceeds half
    of the grid's at tile_size per tile."""
    t = cfg.tile_size
    if not t or (width <= t and height <= t):
        return (1, 1)
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for w, h in cfg.tile_grids()[1:]:
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best, best_diff = (w, h), diff
        elif diff == best_diff and width * height > 0.5 * t * t * w * h:
            best = (w, h)
    return best


def cut_tiles(pixels: torch.Tensor, grid: tuple[int, int], tile: int) -> torch.Tensor:
    """(3, H, W) uint8 page -> (w_t·h_t, 3, tile, tile): stretched to (tile·w_t, tile·h_t), cut row-major."""
    w, h = grid
    page = bicubic(pixels, tile * h, tile * w)
    return page.view(3, h, tile, w, tile).permute(1, 3, 0, 2, 4).reshape(w * h, 3, tile, tile)


def load_views(source: bytes | str | Path | Image.Image, cfg: VLMConfig) -> Views:
    """Decode (if needed) and make every view of one image the model reads, as uint8."""
    pixels = pixels_view(rgb_array(source))
    grid = tile_grid(pixels.shape[2], pixels.shape[1], cfg)
    tiles = cut_tiles(pixels, grid, cfg.tile_size) if grid != (1, 1) else \
        torch.zeros(0, 3, cfg.tile_size, cfg.tile_size, dtype=torch.uint8)
    return Views(fit_square_pixels(pixels, cfg.image_size, cfg.image_resize), tiles, grid,
                 (pixels.shape[2], pixels.shape[1]))


def token_cells(points: list[tuple[float, float]], size: tuple[int, int], cfg: VLMConfig) -> list[int]:
    """The global view's token (row-major in its vision_grid² grid) over each (x, y) point of a source image of
    `size` (width, height), placed as `fit_square` places the image."""
    width, height = size
    side, grid = cfg.image_size, cfg.vision_grid
    left, top, w, h = placement(width, height, side, cfg.image_resize)

    def cell(at: float, offset: int, scale: float) -> int:
        return min(max(int((offset + at * scale) * grid // side), 0), grid - 1)
    return [cell(y, top, h / height) * grid + cell(x, left, w / width) for x, y in points]


def stack_views(views: list[Views], cfg: VLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images' views as the model takes them, uint8: global views (N, 3, S, S), every image's tiles in order
    (M, 3, t, t: the second resolution group) and the grids (N, 2)."""
    size, tile = cfg.image_size, cfg.tile_size
    pixels = torch.stack([v.global_view for v in views]) if views else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    tiles = torch.cat([v.tiles for v in views]) if views else torch.zeros(0, 3, tile, tile, dtype=torch.uint8)
    return pixels, tiles, torch.tensor([v.grid for v in views], dtype=torch.long).view(-1, 2)


def add_mode_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--mode and --max_crops, for the tools that read pages (layout, generate, report)."""
    parser.add_argument("--mode", default=default, help=f"{', '.join(config.RESOLUTION_MODES)} or {config.GUNDAM}"
                        + ("" if default else " (default: the mode the model was trained in)"))
    parser.add_argument("--max_crops", type=int, help="Gundam's most tiles per page (default 6; the paper: 9)")


def apply_mode(cfg: VLMConfig, args: argparse.Namespace, parser: argparse.ArgumentParser) -> VLMConfig:
    """`cfg` with the parsed --mode/--max_crops; a bad value is a one-line usage error naming the field."""
    try:
        if args.mode:
            cfg = cfg.with_mode(args.mode)
        if args.max_crops is not None:
            cfg = replace(cfg, max_crops=args.max_crops)
        return cfg.validate()
    except config.ConfigError as e:
        parser.error(str(e))


def layout_main(argv: list[str] | None = None) -> None:
    """What a page will cost: its tile grid and embedding count in the chosen mode."""
    parser = argparse.ArgumentParser(prog="python -m ocr_vlm.image layout", description=layout_main.__doc__)
    add_mode_arguments(parser, default="base")
    parser.add_argument("--preset", default="d20", choices=sorted(config.PRESETS))
    parser.add_argument("sizes", nargs="+", metavar="WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    cfg = apply_mode(config.preset(args.preset), args, parser)
    for size in args.sizes:
        try:
            width, height = (int(n) for n in size.lower().split("x"))
        except ValueError:
            parser.error(f"size: {size!r} is not WIDTHxHEIGHT")
        if width < 1 or height < 1:
            parser.error(f"size: {size!r} must be positive")
        grid = tile_grid(width, height, cfg)
        print(f"{width}x{height} tiles {grid[0]}x{grid[1]} embeddings {cfg.image_tokens_for(grid)}")

if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["layout"]:
        raise SystemExit("usage: python -m ocr_vlm.image layout --mode=MODE [--max_crops=N] WIDTHxHEIGHT [...]")
    layout_main(sys.argv[2:])
