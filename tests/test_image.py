"""Image processing: every PIL mode a user's page may have, EXIF orientation, padding, clear errors, and the fast
resize's tolerance against DeepSeek-OCR's PIL preprocessing."""

import dataclasses
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ocr_vlm import config
from ocr_vlm.data import render
from ocr_vlm.image import PAD_COLOR, load_array, load_image, load_pixels, load_views, plain_png, token_cells
from ocr_vlm.model.vlm import normalize
from ocr_vlm.rejected import Rejected


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def test_output_range_and_padding_keep_aspect():
    page = Image.new("RGB", (200, 100), (255, 255, 255))        # wide white page
    pixels = normalize(load_pixels(encode(page, "PNG"), size=64, resize="pad"), torch.float32)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert pixels[:, 32, 32].allclose(torch.ones(3))             # white -> +1 in the middle
    grey = (PAD_COLOR[0] / 255 - 0.5) / 0.5
    assert pixels[:, 2, 32].allclose(torch.full((3,), grey))     # grey bands above and below
    assert abs(grey) < 0.005


def scanned_pages(n: int, side: int) -> list[Image.Image]:
    """Rendered pages (text, charts, signs) scaled to a scan's long side, as bench/image_preprocessing.py makes them."""
    rng = random.Random(0)
    pages = [render.random_page(rng).image for _ in range(n)]
    return [page.resize((round(page.width * side / max(page.size)), round(page.height * side / max(page.size))))
            for page in pages]


@pytest.mark.parametrize("side, size, resize", [(1400, 1024, "pad"), (700, 1024, "pad"), (1400, 640, "resize")])
def test_fast_resize_is_within_tolerance_of_pil(side, size, resize):
    """The tolerance of load_pixels against the reference (PIL's bicubic: ImageOps.pad, Image.resize), shrinking and
    enlarging. Measured on 150 pages: mean |d| <= 0.0006 levels, <= 0.06% of values differ, by 1 and rarely 2."""
    delta = torch.cat([(load_pixels(page, size, resize).int() - load_pixels(page, size, resize, reference=True).int())
                       .abs().flatten() for page in scanned_pages(3, side)])
    assert delta.float().mean() <= 0.01
    assert (delta > 0).float().mean() <= 0.005
    assert delta.max() <= 2


@pytest.mark.parametrize("page_size", [(221, 100), (100, 221), (30, 50), (64, 64), (4000, 1)])
def test_fast_pad_places_the_page_as_image_ops_pad(page_size):
    """A flat page resizes exactly, so size rounding and centring must match bit for bit: odd margins (18 above, 17
    below: round half to even), enlarging, no margin, and a page thinner than half a pixel (ImageOps.pad drops it)."""
    page = Image.new("RGB", page_size, (10, 200, 30))
    assert torch.equal(load_pixels(page, 64), load_pixels(page, 64, reference=True))


def test_resize_mode_stretches():
    page = Image.new("RGB", (200, 100), (255, 255, 255))
    assert normalize(load_pixels(page, size=64, resize="resize"), torch.float32).min() == 1.0


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = normalize(load_pixels(encode(image, fmt), size=32), torch.float32)
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    mid = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert load_image(encode(mid, "PNG")).getpixel((4, 4)) == (127, 127, 127)


def test_transparent_pixels_go_on_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(encode(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def with_alpha(image: Image.Image, alpha: Image.Image) -> Image.Image:
    image = image.copy()
    image.putalpha(alpha)                                         # RGB -> RGBA, L -> LA
    return image


def png_variants() -> dict[str, tuple[bytes, bool]]:
    """A rendered page (with a gradient alpha where it has one) as PNGs of every kind, and whether pyspng decodes it."""
    page = scanned_pages(1, 300)[0]
    alpha = Image.linear_gradient("L").resize(page.size)
    rotated = page.getexif()
    rotated[0x0112] = 6                                           # "rotate 90 CW to display"
    return {"RGB": (encode(page, "PNG"), True),
            "RGBA": (encode(with_alpha(page, alpha), "PNG"), True),
            "L": (encode(page.convert("L"), "PNG"), True),
            "P": (encode(page.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), True),
            "P+tRNS": (encode(page.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), False),
            "RGB+tRNS": (encode(page, "PNG", transparency=(255, 255, 255)), False),
            "P 4-bit": (encode(page.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", bits=4), False),
            "LA": (encode(with_alpha(page.convert("L"), alpha), "PNG"), False),
            "1": (encode(page.convert("1"), "PNG"), False),
            "I;16": (encode(Image.fromarray(np.asarray(page.convert("L"), dtype=np.uint16) * 257), "PNG"), False),
            "RGB+EXIF": (encode(page, "PNG", exif=rotated), False)}


@pytest.mark.parametrize("kind", list(png_variants()))
def test_fast_png_decode_equals_pillow(kind):
    """libspng decodes the plain PNGs (8-bit RGB, RGBA, grey, palette) to exactly Pillow's pixels; every other PNG
    falls back to Pillow, so the loader's pixels never depend on which decoder ran."""
    data, fast = png_variants()[kind]
    assert plain_png(Image.open(io.BytesIO(data)), data) == fast
    assert np.array_equal(load_array(data), np.asarray(load_image(data)))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6                                              # "rotate 90 CW to display"
    assert load_image(encode(image, "JPEG", exif=exif)).size == (20, 60)


@pytest.mark.parametrize("load", [load_image, load_array])   # Pillow's decoder, pyspng's
def test_truncated_bytes_fail_clearly(load):
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(Rejected, match="cannot decode"):
        load(data[: len(data) // 2])


def test_unknown_format_fails_clearly():
    with pytest.raises(Rejected, match="not a recognised image format"):
        load_image(b"%PDF-1.4 definitely not an image")


@pytest.mark.parametrize("load", [load_image, load_array])   # pyspng's path checks the header before decoding
def test_decompression_bomb_fails_clearly(monkeypatch, load):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Rejected, match="pixel limit"):
        load(encode(Image.new("L", (40, 30)), "PNG"))     # 1200 px: between 1x and 2x the limit


def test_mode_token_counts_follow_the_config():
    cfg = config.d20()
    counts = {}
    for mode in config.RESOLUTION_MODES:
        cfg = cfg.with_mode(mode)
        counts[mode] = cfg.image_tokens
    assert counts == {"tiny": 73, "small": 111, "base": 273, "large": 421}
    assert config.mini().image_tokens == 73


@pytest.mark.parametrize("resize", ["pad", "resize"])
def test_token_cells_find_a_mark_where_the_global_view_puts_it(resize):
    cfg = dataclasses.replace(config.mini16(), image_resize=resize)
    image = Image.new("RGB", (400, 240), "white")
    ImageDraw.Draw(image).rectangle((290, 60, 301, 71), fill="black")      # centred on (295.5, 65.5)
    views = load_views(encode(image, "PNG"), cfg)
    side = cfg.image_size // cfg.vision_grid
    black = (views.global_view.float().mean(0) < 64).float().unfold(0, side, side).unfold(1, side, side).sum((2, 3))
    assert token_cells([(295.5, 65.5)], views.size, cfg) == [int(black.argmax())]    # not the padding's grey
