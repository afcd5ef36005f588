"""Gundam mode: tile grids and counts against the reference rules worked by hand, the layout order read back from
markers, variable embedding counts in one packed batch, the loader's view cap, KV-cache generation, d20 on meta."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

from ocr_vlm import cli, config, plan
from ocr_vlm.config import ConfigError, DataConfig
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.shards import Record, write_shards
from ocr_vlm.generation import Generator
from ocr_vlm.image import layout_main, load_views, stack_views, tile_grid
from ocr_vlm.model.reading import places
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

TOK = Tokenizer.load(MINI_TOKENIZER)


def gundam(preset=config.mini, max_crops=6) -> config.VLMConfig:
    cfg = preset()
    cfg = cfg.with_mode("gundam")
    cfg.max_crops = max_crops
    return cfg.validate()


# Worked by hand from reference/deepencoder.md §1.6 (640-px tiles; aspect = w_t/h_t; candidates min_crops..max_crops
# tiles) and §1.5 (count = 10·h_t·(10·w_t + 1) + 16·17 + 1).
D20_TABLE = [
    # (width, height, max_crops, grid, embeddings, why)
    (2480, 3508, 6, (2, 3), 903, "A4 portrait, aspect 0.707: 2/3 = 0.667 is closest"),
    (2480, 3508, 9, (2, 3), 903, "no 9-tile candidate is closer than 2/3"),
    (3508, 2480, 6, (3, 2), 893, "A4 landscape, aspect 1.414: 3/2"),
    (3000, 120, 6, (6, 1), 883, "strip, aspect 25: the widest candidate"),
    (3000, 120, 9, (9, 1), 1183, "the widest candidate at 9"),
    (120, 3000, 6, (1, 6), 933, "the tallest candidate"),
    (600, 400, 6, (1, 1), 273, "both sides <= 640: the global view only, as Base"),
    (640, 640, 6, (1, 1), 273, "exactly 640 on both sides: still no tiles"),
    (641, 640, 6, (2, 2), 693, "one pixel over: tiled, aspect ~1 -> 2x2"),
    (640, 1280, 6, (1, 2), 493, "aspect 0.5 exactly"),
    (640, 1280, 9, (1, 2), 493, "ties with 2x4, but the area 0.82M is not over half of 2x4's 3.28M"),
    (1280, 2560, 9, (2, 4), 1113, "the same tie, area 3.28M over 1.64M: the larger grid"),
    (1000, 1000, 9, (2, 2), 693, "ties with 3x3, area 1M under half of 3x3's 3.69M"),
    (5000, 5000, 6, (2, 2), 693, "square: 2x2 is the only aspect-1 grid up to 6"),
    (5000, 5000, 9, (3, 3), 1203, "ties with 2x2, area 25M over 1.84M: 3x3"),
]


@pytest.mark.parametrize("width,height,max_crops,grid,embeddings,why", D20_TABLE)
def test_d20_tile_grid_and_embedding_count(width, height, max_crops, grid, embeddings, why):
    cfg = gundam(config.d20, max_crops)
    assert (cfg.image_size, cfg.tile_size) == (1024, 640)
    assert tile_grid(width, height, cfg) == grid, why
    assert cfg.image_tokens_for(grid) == embeddings


@pytest.mark.parametrize("width,height,grid,embeddings", [
    (620, 877, (2, 3), 5 * 3 * (5 * 2 + 1) + 8 * 9 + 1),   # A4 at a quarter of the scale: the same grid
    (750, 30, (6, 1), 5 * (5 * 6 + 1) + 73),
    (160, 160, (1, 1), 73),                                 # within one 160-px tile
    (161, 160, (2, 2), 5 * 2 * 11 + 73),
])
def test_mini_preset_keeps_the_rules_at_256_and_160_px(width, height, grid, embeddings):
    cfg = gundam()
    assert (cfg.image_size, cfg.tile_size, cfg.vision_grid, cfg.tile_grid_side) == (256, 160, 8, 5)
    assert tile_grid(width, height, cfg) == grid
    assert cfg.image_tokens_for(grid) == embeddings


def test_layout_tool_prints_grid_and_count_per_size(capsys):
    layout_main(["--mode=gundam", "2480x3508", "3000x120", "640x640"])
    layout_main(["--mode=gundam", "--max_crops=9", "5000x5000"])
    layout_main(["--mode=small", "2480x3508"])
    assert capsys.readouterr().out.splitlines() == [
        "2480x3508 tiles 2x3 embeddings 903", "3000x120 tiles 6x1 embeddings 883", "640x640 tiles 1x1 embeddings 273",
        "5000x5000 tiles 3x3 embeddings 1203", "2480x3508 tiles 1x1 embeddings 111"]
    with pytest.raises(SystemExit):
        layout_main(["--mode=gundam", "--max_crops=1", "10x10"])
    assert "max_crops: 1 is below min_crops=2" in capsys.readouterr().err


def test_bad_gundam_settings_name_the_field():
    cfg = gundam()
    cfg.max_crops = 1
    with pytest.raises(ConfigError, match="^max_crops: "):
        cfg.validate()
    train = config.TrainConfig(model=gundam(), data=DataConfig(seq_len=512, max_images=6))
    with pytest.raises(ConfigError, match=r"^data.max_images: 6 cannot hold one Gundam page of up to model.max_crops=6"):
        train.validate()


def test_fixed_modes_are_one_global_view():
    cfg = config.d20()
    for mode, count in {"tiny": 73, "small": 111, "base": 273, "large": 421}.items():
        cfg = cfg.with_mode(mode)
        assert cfg.tile_size == 0 and cfg.tile_grids() == [(1, 1)]
        assert cfg.image_tokens_for((1, 1)) == cfg.max_image_tokens == cfg.image_tokens == count
        assert tile_grid(5000, 100, cfg) == (1, 1)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_tiles_are_cut_row_major_from_the_stretched_page():
    """A 320x480 page at mini is a 2x3 grid of exactly 160-px blocks (no stretch): block (col, row) painted
    10·(2·row + col) + 40 comes back as tile 2·row + col; the global view is the page padded to 256."""
    page = Image.new("RGB", (320, 480))
    for k in range(6):
        col, row = k % 2, k // 2
        page.paste((10 * k + 40,) * 3, (160 * col, 160 * row, 160 * (col + 1), 160 * (row + 1)))
    views = load_views(png(page), gundam())
    assert views.grid == (2, 3) and views.tiles.shape == (6, 3, 160, 160) and views.global_view.shape == (3, 256, 256)
    assert [int(t[:, 40:120, 40:120].float().mean().round()) for t in views.tiles] == [40, 50, 60, 70, 80, 90]


def test_layout_order_read_back_from_markers():
    """Every tile token and global token carries (image, view, tile, row, col); the merged sequence must read: each
    image's tiles stitched (rows of w_t tiles, each row closed by a newline), its global rows, then the separator."""
    cfg = gundam()
    model = build_model(cfg)
    d, t, g = cfg.gpt.n_embd, cfg.tile_grid_side, cfg.vision_grid
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
        model.view_separator.fill_(-2.0)
    grids = [(2, 3), (1, 1), (3, 1)]

    def marker(*fields):
        v = torch.zeros(d)
        v[:5] = torch.tensor(fields, dtype=torch.float)
        return v

    tiles = torch.stack([torch.stack([marker(i, 1, k, r, c) for r in range(t) for c in range(t)])
                         for i, (w, h) in enumerate(grids) if (w, h) != (1, 1) for k in range(w * h)])
    globals_ = torch.stack([torch.stack([marker(i, 2, 0, r, c) for r in range(g) for c in range(g)])
                            for i in range(len(grids))])
    newline, separator = torch.full((d,), -1.0), torch.full((d,), -2.0)
    expected = []                                # written from the rule, not from the code's reshapes
    for i, (w, h) in enumerate(grids):
        if (w, h) != (1, 1):
            for row in range(t * h):
                expected += [marker(i, 1, (row // t) * w + col // t, row % t, col % t) for col in range(t * w)]
                expected.append(newline)
        for row in range(g):
            expected += [marker(i, 2, 0, row, col) for col in range(g)] + [newline]
        expected.append(separator)
    with torch.no_grad():
        merged = model.layout(globals_, tiles, torch.tensor(grids))
    assert merged.shape == (sum(cfg.image_tokens_for(gr) for gr in grids), d)
    assert torch.equal(merged, torch.stack(expected))


def trained_like(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


PAGES = [(620, 877), (100, 100), (750, 30)]      # grids 2x3, 1x1, 6x1 at mini


def views_of(sizes, seed=0):
    torch.manual_seed(seed)
    cfg = gundam()
    return [load_views(Image.fromarray((torch.rand(h, w, 3) * 255).byte().numpy()), cfg) for w, h in sizes]


def test_variable_counts_pack_into_one_row_and_each_sample_sees_only_itself():
    """Three pages of different grids packed in one row give each sample the logits it gets alone."""
    cfg = gundam()
    model = trained_like(cfg)
    views = views_of(PAGES)
    samples = [TOK.render_sample("<image>\nFree OCR.", f"page {i}", cfg.image_tokens_for(v.grid))[0]
               for i, v in enumerate(views)]
    assert [s.count(TOK.image_id) for s in samples] == [238, 73, 228]
    ids = torch.tensor([sum(samples, [])])
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    doc_ids = torch.cat([torch.full((len(s),), k) for k, s in enumerate(samples)])[None]
    pixels, tiles, grids = stack_views(views, cfg)
    assert tiles.shape == (12, 3, 160, 160) and grids.tolist() == [[2, 3], [1, 1], [6, 1]]
    with torch.no_grad():
        packed = model(ids, pixel_values=pixels, tile_values=tiles, tile_grids=grids,
                       position_ids=positions, doc_ids=doc_ids)
        at = 0
        for s, v in zip(samples, views):
            p, t, gr = stack_views([v], cfg)
            alone = model(torch.tensor([s]), pixel_values=p, tile_values=t, tile_grids=gr)
            torch.testing.assert_close(packed[:, at:at + len(s)], alone, atol=1e-4, rtol=1e-4)
            at += len(s)
        with pytest.raises(ValueError, match=r"3 image\(s\) need 539 <\|image\|> placeholders \(238\+73\+228 by tile"):
            model(ids[:, :-50], pixel_values=pixels, tile_values=tiles, tile_grids=grids)


def gundam_batch(cfg, sizes):
    views = views_of(sizes)
    ids = torch.tensor([sum((TOK.render_sample("<image>\nx", "ab", cfg.image_tokens_for(v.grid))[0] for v in views), [])])
    pixels, tiles, grids = stack_views(views, cfg)
    return dict(input_ids=ids, targets=ids.roll(-1, 1), pixel_values=pixels, tile_values=tiles,
                tile_grids=grids)


def test_training_forward_reaches_every_parameter_with_and_without_tiles():
    cfg = gundam()
    for sizes in (PAGES, [(100, 100)]):       # a batch without tiles runs a blank tile, weighted by zero
        model = trained_like(cfg).train()
        model(**gundam_batch(cfg, sizes)).backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_reading_head_reads_the_global_views_of_a_tiled_batch():
    cfg = dataclasses.replace(gundam(), reading_head=True)
    lm, reading, _ = build_model(cfg).train()(**gundam_batch(cfg, PAGES),
                                           reading=places([("AB", None)] * 3))
    assert torch.isfinite(lm) and (reading > 0).all()


def test_loader_packs_pages_of_every_grid_under_the_view_cap(tmp_path):
    cfg = gundam()
    sizes = [(620, 877), (100, 100), (750, 30), (300, 300), (90, 200)] * 2     # 2x3, 1x1, 6x1, 2x2, 1x2
    records = [Record(f"p{i:02d}", {"id": f"p{i:02d}", "prompt": "<image>\nFree OCR.", "response": f"page {i}"},
                      png(Image.new("RGB", (w, h), (i * 20, 90, 200))), "png") for i, (w, h) in enumerate(sizes)]
    write_shards(records, tmp_path / "pages", max_count=10)
    data = DataConfig(shards=str(tmp_path / "pages"), seq_len=600, num_workers=0, max_images=8)
    batches = list(Loader(data, cfg, MINI_TOKENIZER, finite=True, batch_rows=2))
    assert sum(b["counters"]["vision_samples"] for b in batches) == len(sizes)
    for b in batches:
        grids = [tuple(g) for g in b["tile_grids"].tolist()]
        tiles = sum(w * h for w, h in grids if (w, h) != (1, 1))
        assert b["tile_values"].shape == (tiles, 3, 160, 160) and b["pixel_values"].shape == (len(grids), 3, 256, 256)
        assert len(grids) + tiles <= 8                                  # the cap counts the tiles too
        assert int((b["input_ids"] == cfg.image_token_id).sum()) == sum(cfg.image_tokens_for(g) for g in grids)
    assert {g for b in batches for g in map(tuple, b["tile_grids"].tolist())} == {(2, 3), (1, 1), (6, 1), (2, 2), (1, 2)}


def test_kv_cache_generation_with_tiles_equals_recompute_and_one_by_one():
    cfg = gundam()
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    engine = Generator(model, TOK)
    views = views_of(PAGES)
    pixels, tiles, grids = stack_views(views, cfg)
    prompts = ["<image>\nFree OCR.", "<image>\nRead it.", "<image>\nParse the figure, then list it."]
    kw = dict(max_new_tokens=20, tiles=tiles, grids=grids)
    cached = engine.generate(prompts, pixels, **kw)
    assert cached == engine.generate(prompts, pixels, use_cache=False, **kw)
    alone = []
    for p, v in zip(prompts, views):
        pi, ti, gi = stack_views([v], cfg)
        alone += engine.generate([p], pi, max_new_tokens=20, tiles=ti, grids=gi)
    assert cached == alone
    ids = torch.tensor([TOK.render_prompt(prompts[0], 238)])      # and the tiles reach the logits: swap page 0's
    with torch.no_grad():
        own, swapped = (model(ids, pixel_values=pixels[:1], tile_values=t, tile_grids=grids[:1])
                        for t in (tiles[:6], tiles[6:]))
    assert not torch.allclose(own, swapped)


@pytest.mark.parametrize("grid,count", [((2, 3), 903), ((1, 1), 273)])
def test_d20_gundam_shapes_on_meta(grid, count):
    cfg = gundam(config.d20)
    model = build_model(cfg, device="meta")
    tiles = torch.empty(grid[0] * grid[1] if grid != (1, 1) else 0, 3, 640, 640, device="meta")
    assert model.sam_model(torch.empty(1, 3, 640, 640, device="meta")).shape == (1, 1024, 10, 10)
    out = model.encode_images(torch.empty(1, 3, 1024, 1024, device="meta"), tiles, torch.tensor([grid]))
    assert out.shape == (1, count, 1280)


def test_plan_counts_tiles_in_global_view_equivalents():
    """d20 stage 2, 2 x 8192 tokens: untiled pages give 2 x 30 = 60 global views; 3x1 pages (583 embeddings) give
    14 per row of 1 + 3·(640/1024)² = 2.17 views each, 2 x 30.4 -> 61, the worst grid. A cap counts views whole."""
    def cfg(*args):
        return cli.train_config(["--preset=d20", "--stage=2", "--data.text_shards=unread", "--micro_batch=2", *args])

    assert plan.images_per_micro_batch(cfg("--mode=base")) == 60
    assert plan.images_per_micro_batch(cfg("--mode=gundam")) == 61
    assert plan.images_per_micro_batch(cfg("--mode=gundam", "--data.max_images=12")) == 12
