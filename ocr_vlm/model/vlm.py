"""nano-DeepSeek-OCR: DeepEncoder (SAM -> compressor -> CLIP) + projector + nanochat GPT.

    uint8 pixels (N,3,S,S) ─ normalize ─ sam_model ─▶ (N,C,g,g) ─ vision_model ─▶ (N,1+g²,W)
    cat(CLIP[:,1:], SAM tokens) ─ projector ─▶ (N,g²,D) ─ layout ─▶ N × (g·(g+1)+1, D)
    Gundam: the tiles (M,3,t,t) take the same towers ─▶ (M,t²,D); layout puts each image's tiles, stitched, first
    token embeddings with the <|image|> positions replaced, in order ─ gpt ─▶ loss or logits
    (from scratch) the projected tokens ─ vision_norm ─▶ standardised over the pages, per position
    (training only) the projected tokens (N,g²,D) ─ reading_head ─▶ loss against the page's characters
    (reading_code) the reading head's readouts ─ embedded ─▶ added to the normed tokens the GPT reads
    (training only) one GPT head's attention ─ pointer ─▶ loss: it should rest on the character being written,
                    and its output alone name it
    (reading_place) each vision token ─ + its place's code; each answer token ─ + where the pointer looked most
                    when it was written (training: one step from the true places, `looked`)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ocr_vlm.config import COMPONENTS, TOWERS, VLMConfig
from ocr_vlm.model.clip import ClipEncoder
from ocr_vlm.model.gpt import GPT, chunked_cross_entropy
from ocr_vlm.model.reading import (POINTER_HEAD, POINTER_LAYER, Places, Read, Reading, ReadingHead, VisionNorm,
                                   pointer_loss)
from ocr_vlm.model.sam import SamEncoder

MEAN = STD = 0.5     # DeepSeek-OCR's ToTensor + Normalize; image.PAD_COLOR is this mean in uint8


def normalize(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] in `dtype`, on their device. The model calls it: batches carry uint8, 4x smaller."""
    return (pixels.to(dtype) / 255.0 - MEAN) / STD


class Projector(nn.Module):
    """DeepSeek-OCR's linear projector; the `layers` name matches its checkpoint keys."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layers = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.gpt.n_embd
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipEncoder(cfg.clip)
        self.projector = Projector(cfg.clip.width + cfg.sam.compressor_channels[1], width)
        self.image_newline = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.view_separator = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.gpt = GPT(cfg.gpt)
        # what lets towers trained from scratch learn (model/reading.py): the norm, one per view grid (Gundam's tiles
        # have a token grid of their own), and the training-only reading head
        views = {"global": cfg.vision_grid ** 2, **({"tile": cfg.tile_grid_side ** 2} if cfg.tile_size else {})}
        self.vision_norm = nn.ModuleDict({view: VisionNorm(n, width) for view, n in views.items()}) \
            if cfg.vision_norm else None
        self.reading_head = ReadingHead(width, cfg.reading_code, cfg.reading_back, cfg.reading_predecessor) \
            if cfg.reading_head else None
        self.reading_places = Places(cfg.vision_grid, width) if cfg.reading_place else None

    def vision_tokens(self, pixels: torch.Tensor, real: bool = True) -> torch.Tensor:
        """(N,3,S,S) uint8 pixels (or already normalised floats) -> (N, g², D): the token grid the GPT reads,
        row-major, before the layout adds newlines. `real=False` marks a stand-in (a blank image): the vision norm
        then leaves its statistics alone."""
        return self.read_tokens(self.projected_tokens(pixels), real)[0]

    def read_tokens(self, projected: torch.Tensor, real: bool = True,
                    head: bool = False) -> tuple[torch.Tensor, Read | None]:
        """Projected tokens (N, g² or t², D) -> (what the GPT reads: after the vision norm, with the reading head's
        embedded code added when the model has one (`reading_code`); the head's `Read` of them where that ran:
        with the code, or when asked for (`head`), e.g. for its losses and counts). The head reads them once."""
        run = self.reading_head is not None and (head or self.cfg.reading_code)
        read = self.reading_head.read(projected) if run else None
        tokens = self.norm_tokens(projected, real)
        if self.cfg.reading_code:
            tokens = tokens + self.reading_head.embed(read.logits).to(tokens.dtype)
        return tokens, read

    def projected_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,3,S,S) pixels -> (N, g², D): the towers' projected tokens, before the vision norm."""
        dtype = self.projector.layers.weight.dtype
        pixels = normalize(pixels, dtype) if pixels.dtype == torch.uint8 else pixels.to(dtype)
        sam = self.sam_model(pixels)
        clip = self.vision_model(sam)
        fused = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)   # CLIP first: projector weights depend on it
        return self.projector(fused)

    def norm_tokens(self, tokens: torch.Tensor, real: bool = True) -> torch.Tensor:
        """The vision norm of projected tokens (N, g² or t², D), when the model has one."""
        if self.vision_norm is None:
            return tokens
        view = "global" if tokens.shape[1] == self.cfg.vision_grid ** 2 else "tile"
        return self.vision_norm[view](tokens, batch_statistics=real)

    def layout(self, tokens: torch.Tensor, tiles: torch.Tensor | None = None,
               grids: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's embeddings in order, as one (Σ image_tokens_for(grid), D) sequence. `tokens` (N, g², D) are
        the global views; a Gundam batch adds its tiles' tokens (M, t², D) and the images' (N, 2) grids (w_t, h_t).
        Per image: its tiles stitched into one grid of t·h_t rows of t·w_t tokens, each row closed by a newline, then
        the global grid the same way, then the view separator (local first, as DeepSeek-OCR's code does)."""
        n, g, d = tokens.shape[0], self.cfg.vision_grid, tokens.shape[-1]
        views = torch.cat([self._rows(tokens.view(n, g, g, d)), self.view_separator.to(tokens.dtype).expand(n, 1, d)], 1)
        if tiles is None or not len(tiles):
            return views.flatten(0, 1)
        t, parts = self.cfg.tile_grid_side, []
        grids = grids.tolist()
        for (w, h), view, local in zip(grids, views, tiles.split([w * h if (w, h) != (1, 1) else 0 for w, h in grids])):
            if len(local):
                parts.append(self._rows(local.view(h, w, t, t, d).permute(0, 2, 1, 3, 4).reshape(1, h * t, w * t, d))[0])
            parts.append(view)
        return torch.cat(parts)

    def _rows(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, rows, cols, D) -> (N, rows·(cols+1), D): every row closed by the newline embedding."""
        n, rows, _, d = grid.shape
        return torch.cat([grid, self.image_newline.to(grid.dtype).expand(n, rows, 1, d)], dim=2).flatten(1, 2)

    def encode_images(self, pixels: torch.Tensor, tiles: torch.Tensor | None = None,
                      grids: torch.Tensor | None = None) -> torch.Tensor:
        """N images of one tile grid: global views (N,3,S,S) [+ their tiles (M,3,t,t) and grids (N,2)] ->
        (N, image_tokens_for(grid), D), what replaces each image's <|image|> placeholders. The two resolution groups
        each go through the towers once. (A batch of several grids is laid out flat, image by image, by `embed`.)"""
        tiled = tiles is not None and len(tiles) > 0
        if tiled and len(grids.unique(dim=0)) > 1:
            raise ValueError(f"grids: encode_images takes images of one tile grid, got {grids.tolist()}")
        flat = self.layout(self.vision_tokens(pixels), self.vision_tokens(tiles) if tiled else None, grids)
        return flat.view(len(pixels), -1, flat.shape[-1])

    def embed(self, input_ids: torch.Tensor, vision: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
              grids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's layout (global `vision_tokens`, and in Gundam its tiles' tokens and
        grid) written into its <|image|> placeholders, in order."""
        x = self.gpt.embed(input_ids)
        slots = input_ids == self.cfg.image_token_id
        n_images = 0 if vision is None else vision.shape[0]
        counts = [self.cfg.image_tokens_for(tuple(grid)) for grid in grids.tolist()] if grids is not None \
            else [self.cfg.image_tokens] * n_images
        expected, found = sum(counts), int(slots.sum())
        if expected != found:
            each = f"{counts[0]} each" if len(set(counts)) <= 1 else f"{'+'.join(map(str, counts))} by tile grid"
            raise ValueError(f"{n_images} image(s) need {expected} <|image|> placeholders ({each}) "
                             f"but input_ids holds {found}")
        if n_images:
            x = x.masked_scatter(slots.unsqueeze(-1), self.layout(vision, tiles, grids).to(x.dtype))
            if self.reading_places is not None:
                x = x + self.reading_places.keys(self.places(input_ids)).to(x.dtype) * slots.unsqueeze(-1)
        return x

    def places(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> each position's place in its image's layout (the k-th <|image|> placeholder of an image is
        place k; the global view only: every image has image_tokens of them). Meaningless off the placeholders."""
        slots = input_ids == self.cfg.image_token_id
        return (slots.cumsum(1) - 1).clamp(min=0) % self.cfg.image_tokens

    @property
    def look(self) -> tuple[int, int] | None:
        """The (layer, head) whose scores generation hands back to tell each next token its place (`told_next`),
        or None for a model without places."""
        return (POINTER_LAYER, POINTER_HEAD) if self.reading_places is not None else None

    def image_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids of prompts with one image each -> (B, image_tokens): where each row's placeholders are, in
        place order (generation's, for `told_next`)."""
        return (input_ids == self.cfg.image_token_id).nonzero()[:, 1].view(len(input_ids), -1)

    def told_next(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """What the token generated next is told (`reading_place`): the place the pointer's head looked at most from
        each row's last position, given its `scores` (B, T, keys) (`GPT.hidden`'s `look`) and the rows' `image_slots`.
        (B, 1, D)."""
        return self.reading_places.told(scores[:, -1].gather(1, slots).argmax(-1))[:, None]

    def told(self, x: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Embeddings `x` with each answer token told where its character was read from (`reading_place`): the
        token each of the pointer's `pairs` (row, position, vision position, page) writes, where it is read next
        (not the end token: nothing reads it), gets the place of the pair's vision position."""
        rows, positions, keys = pairs[:, 0], pairs[:, 1], pairs[:, 2]
        after = (positions + 1).clamp(max=input_ids.shape[1] - 1)
        fed = (positions + 1 < input_ids.shape[1]) & (input_ids[rows, after] == targets[rows, positions])
        told = self.reading_places.told(self.places(input_ids)[rows[fed], keys[fed]]).to(x.dtype)
        return x.index_put((rows[fed], after[fed]), told, accumulate=True)

    def looked(self, x: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, pairs: torch.Tensor,
               position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The pointer's `pairs` with each vision position replaced by the image token its head looks at most from
        the pair's position, told the true places (no gradient): what generation tells the next token, one step at a
        time. Told the true ones instead, the position after a line break learns the answer to the lookup made from
        the position that writes it, which fails there (the next line's first character: found 21% of the time,
        README #places), and generation is never told it."""
        with torch.no_grad():
            rows, _ = self.gpt.hidden(self.told(x, input_ids, targets, pairs), position_ids, doc_ids,
                                      attention=(POINTER_LAYER, POINTER_HEAD, pairs), probe=True)
        slots = (input_ids == self.cfg.image_token_id)[pairs[:, 0]]
        most = rows.masked_fill(~slots, float("-inf")).argmax(-1, keepdim=True)
        return torch.cat([pairs[:, :2], most, pairs[:, 3:]], 1)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, reading: Reading | tuple | None = None,
                tile_values: torch.Tensor | None = None, tile_grids: torch.Tensor | None = None):
        """Mean cross-entropy over supervised targets (never full fp32 logits), or logits when no targets.

        Gundam batches add `tile_values` (M,3,t,t), every image's tiles in order, and `tile_grids` (N,2).
        With `reading` (model/reading.py's `Reading`: the images' reading targets, and where on the pages they are)
        it returns (cross-entropy, each of the reading head's readouts' loss over the global views, the pointer's
        loss: 0 without one); weighing them is the trainer's business.

        A text-only batch in training still runs the towers (and the reading head), on a blank image weighted by
        zero, at the same points as a batch with images; in Gundam mode a batch without tiles runs a blank tile the
        same way: under ZeRO-3 every rank gathers the same parameters in the same order every step, and every
        trainable parameter gets a gradient."""
        images = pixel_values is not None and len(pixel_values) > 0
        tiled = images and bool(self.cfg.tile_size) and tile_values is not None and len(tile_values) > 0
        towers = images or self.training
        if towers:
            # Read on every rank alike: under ZeRO-3, touching a partitioned weight outside its module's forward
            # gathers it, a collective.
            dtype, device = self.projector.layers.weight.dtype, input_ids.device
            # the reading head reads the tokens before the norm, so its code does not move with the statistics
            projected = self.projected_tokens(pixel_values if images else blank(self.cfg.image_size, dtype, device))
            # read once: the code the GPT reads and the head's losses come from the same readouts
            vision, read = self.read_tokens(projected, images, head=reading is not None)
            if self.cfg.tile_size:
                tiles = self.vision_tokens(tile_values if tiled else blank(self.cfg.tile_size, dtype, device), tiled)
        x = self.embed(input_ids, vision if images else None, tiles if tiled else None, tile_grids if tiled else None)
        reading = Reading(*reading) if reading is not None else None
        if self.reading_places is not None and reading is not None and images and targets is not None:
            looked = self.looked(x, input_ids, targets, reading.pointer, position_ids, doc_ids)
            x = self.told(x, input_ids, targets, looked)
        # Blanks join the graph after the embedding, as real images do: ranks then run backward in the same order.
        unused = ([self.layout(vision)] if towers and not images else []) + \
            ([tiles] if towers and self.cfg.tile_size and not tiled else [])
        for u in unused:
            x = x + 0.0 * u.sum()
        pointing = reading is not None and self.cfg.reading_pointer
        out = self.gpt.hidden(x, position_ids=position_ids, doc_ids=doc_ids,
                              attention=(POINTER_LAYER, POINTER_HEAD, reading.pointer[:, :3])
                              if pointing else None)
        h, attended = out if pointing else (out, None)
        if targets is None:
            return self.gpt.logits(h)
        loss = chunked_cross_entropy(h, self.gpt.lm_head.weight, targets, self.cfg.gpt.logit_softcap)
        if reading is None:
            return loss
        if images:
            head = self.reading_head.losses(read, reading)
        else:
            head = 0.0 * read.logits.sum((1, 2, 3)) if self.training \
                else loss.new_zeros(len(self.reading_head.readouts()))
        pointer = pointer_loss(self.gpt, attended, targets, reading.pointer, len(reading.lengths)) if pointing \
            else head.sum() * 0.0
        return loss, head, pointer

    def freeze(self, components: tuple[str, ...]) -> None:
        """requires_grad=False on the named components; an optimizer then only ever sees the trainable rest."""
        for name in components:
            for p in self.component_parameters(name):
                p.requires_grad_(False)

    def running_statistics(self) -> list[torch.Tensor]:
        """The buffers a training forward moves towards its own batch (the vision norm's): on several ranks each
        sees other pages, so whoever trains must keep them equal over the ranks."""
        if self.vision_norm is None:
            return []
        return [b for norm in self.vision_norm.values() for b in (norm.running_mean, norm.running_var)]

    def component_parameters(self, component: str) -> list[nn.Parameter]:
        params = []
        for name in COMPONENTS[component]:
            part = getattr(self, name)
            if part is not None:
                params += [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        return params

    def set_activation_checkpointing(self, towers: tuple[str, ...]) -> None:
        """Recompute each block's activations in backward instead of storing them, in the named towers only."""
        for name in TOWERS:
            (module,) = COMPONENTS[name]
            getattr(self, module).gradient_checkpointing = name in towers


def parameter_counts(model: VLM) -> dict[str, tuple[int, int]]:
    """Per component: (parameters, trainable parameters)."""
    return {name: (sum(p.numel() for p in model.component_parameters(name)),
                   sum(p.numel() for p in model.component_parameters(name) if p.requires_grad)) for name in COMPONENTS}


def parameter_table(model: VLM) -> str:
    """`parameter_counts` as the table the trainer and `python -m ocr_vlm.model --summary` print, with the total."""
    counts = parameter_counts(model)
    rows = [*counts.items(), ("total", tuple(map(sum, zip(*counts.values()))))]
    return "\n".join([f"{'component':<12}{'parameters':>16}{'trainable':>16}"] +
                     [f"{name:<12}{n:>16,}{t:>16,}  ({n / 1e6:,.2f}M)" for name, (n, t) in rows])


def blank(side: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One blank (side x side) image: what the towers run on when a training batch has no image of a group."""
    return torch.zeros(1, 3, side, side, dtype=dtype, device=device)


def build_model(cfg: VLMConfig, device: str | torch.device = "cpu") -> VLM:
    """Build with initialised weights; on the meta device only shapes exist (for sizing the d20 model)."""
    with torch.device(device):
        return VLM(cfg)
