"""What a character's place inside its token costs the code: glyphs learnt from crops centred on them, or shifted.

    python bench/reading_crops.py [--shift 8] [--steps 300] [--threads 1]   (about 3 min a run)

bench/reading_towers.py measures how fast the towers learn to name the character centred in each 16 px token of the
line set. Here a small CNN (three stride-2 convs, GELU, a linear readout; no towers, no background class) learns the
same characters from 48 px crops of the same pages, 28 pages' characters a step, AdamW at 1e-3, each crop centred on
its character's box and then moved by up to `--shift` px either way in x and y: 0; 8, the spread of a character's
centre inside mini16's 16 px token (the token nearest the centre is the one trained on it); or 4, what 8 px tokens
would leave. The crop keeps the whole glyph either way. Printed every 50 steps: the share of 100 held-out pages'
characters it names.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from harness import fix_threads, parser
from ocr_vlm.data.render import READING_SETS, reading_page

CROP = 48
PAGES = 28


def crops(rng: random.Random, moves: random.Random, n: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The characters of n line pages (drawn from `rng`; `moves` draws the shifts, so every --shift sees the same
    pages): (chars, 3, CROP, CROP) crops in [-1, 1] and their code points."""
    half, images, labels = CROP // 2, [], []
    for _ in range(n):
        page = reading_page(rng, READING_SETS["line"])
        pixels = np.pad(np.asarray(page.image, dtype=np.float32) / 127.5 - 1, ((CROP,) * 2, (CROP,) * 2, (0, 0)))
        for char, (x0, y0, x1, y1) in zip(page.text, page.chars):
            x = round((x0 + x1) / 2) + CROP + moves.randint(-shift, shift)
            y = round((y0 + y1) / 2) + CROP + moves.randint(-shift, shift)
            images.append(pixels[y - half:y + half, x - half:x + half])
            labels.append(ord(char))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)


def main() -> None:
    p = parser(__doc__, threads=1)
    p.add_argument("--shift", type=int, default=8, help="px a crop moves at most, either way (default %(default)s)")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    fix_threads(args.threads)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                        nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Flatten(), nn.Linear(128 * (CROP // 8) ** 2, 128))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    held_out = crops(random.Random(2), random.Random(3), 100, args.shift)
    train, moves = random.Random(1), random.Random(4)
    for step in range(1, args.steps + 1):
        images, labels = crops(train, moves, PAGES, args.shift)
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            with torch.no_grad():
                named = (net(held_out[0]).argmax(-1) == held_out[1]).float().mean().item()
            print(f"shift {args.shift}: step {step:4d} | loss {loss.item():.3f} | held-out characters named {named:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
