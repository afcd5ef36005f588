"""How fast the towers alone learn the line set's character code, and what a step of them costs.

    python bench/reading_towers.py [--arm narrow|wide] [--steps 300] [--lr 1e-3] [--pages 28] [--train_set line]
                                   [--optimizer adamw|muon] [--muon_lr 0.02] [--threads 2]
    (narrow: about 6 min for 300 steps; wide: about 20)

The GPT's side of reading is what bench/reading_gpt.py measures; this bench takes it away. The towers, projector and
reading head (model/reading.py) of `--preset=mini16` learn from line pages (`READING_SETS["line"]`, rendered on the
fly) what the trainer's reading loss teaches them: each token's character and the one before it, on the tokens the
characters' centres fall in; 28 pages a step, AdamW at 1e-3, clip 1.0 (`--pages` and `--lr` change the first two;
`--train_set lines` trains on pages of up to five such lines, three times the characters a page, `--train_set
dense` on pages of up to eight lines of 4-10 characters; `--optimizer muon` trains them as the trainer's
`--optimizer=muon` does: DeepSpeed's Muon at `--muon_lr` on their hidden matrices, AdamW at `--lr` on the rest,
`ocr_vlm.train.param_groups`). Printed every 50 steps: *ink accuracy*, the share of 100
held-out line pages' characters whose token's own readout names them (chance about 0.02), and the seconds a step
has taken so far.

Arms: `narrow`, mini16's SAM (width 32, one head, 2 blocks); `wide`, mini's SAM width and depth (64, two heads, 4
blocks) at mini16's 4 px patches, which mini16 had before. Run arms one at a time.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch

from harness import fix_threads, parser
from ocr_vlm import cli, config
from ocr_vlm.data.render import READING_SETS, reading_page
from ocr_vlm.data.sample import character_centres
from ocr_vlm.image import load_views, token_cells
from ocr_vlm.model.reading import Reading, places
from ocr_vlm.model.vlm import build_model
from ocr_vlm.train import _optimizer, param_groups

PAGES = 28                       # a step's pages: what `make read` packs into a step
ARMS = {
    "narrow": lambda cfg: cfg,
    "wide": lambda cfg: replace(cfg, sam=replace(cfg.sam, width=64, heads=2, depth=4)),
}


def pages(cfg: config.VLMConfig, rng: random.Random, n: int, name: str = "line") -> tuple[torch.Tensor, Reading]:
    """n rendered pages of a reading set: uint8 pixels, and what they say about their characters."""
    pixels, placed = [], []
    for _ in range(n):
        page = reading_page(rng, READING_SETS[name])
        views = load_views(page.image, cfg)
        pixels.append(views.global_view)
        placed.append((page.text, token_cells(character_centres(page.chars, page.text), views.size, cfg)))
    return torch.stack(pixels), places(placed)


def ink_accuracy(model, held_out: tuple[torch.Tensor, Reading]) -> float:
    pixels, reading = held_out
    model.eval()
    with torch.no_grad():
        read = model.reading_head.read(model.projected_tokens(pixels))
        named, _, _, placed = model.reading_head.named(read, reading).tolist()
    model.train()
    return named / placed


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arm", choices=ARMS, default="narrow")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (default %(default)s)")
    p.add_argument("--pages", type=int, default=PAGES, help="pages a step (default %(default)s)")
    p.add_argument("--train_set", choices=sorted(READING_SETS), default="line",
                   help="the reading set it trains on (default %(default)s)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--muon_lr", type=float, default=0.02, help="Muon's lr (default %(default)s)")
    args = p.parse_args()
    fix_threads(args.threads)
    recipe = cli.train_config([f"--lr={args.lr}", f"--optimizer={args.optimizer}", f"--muon_lr={args.muon_lr}"])
    cfg = ARMS[args.arm](replace(config.mini16(), reading_head=True)).validate()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.freeze(("gpt",))                      # the towers' side alone: the optimizer leaves the GPT out
    params = [q for name in ("sam", "clip", "projector") for q in model.component_parameters(name)]
    optimizer = _optimizer(param_groups(model, recipe), recipe, offload=False)
    train, held_out = random.Random(1), pages(cfg, random.Random(2), 100)
    spent = 0.0
    for step in range(1, args.steps + 1):
        pixels, reading = pages(cfg, train, args.pages, args.train_set)
        start = time.perf_counter()
        loss = model.reading_head.losses(model.reading_head.read(model.projected_tokens(pixels)), reading).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        spent += time.perf_counter() - start
        if step % 50 == 0:
            print(f"{args.arm}: step {step:4d} | reading loss {loss.item():.3f} | ink accuracy "
                  f"{ink_accuracy(model, held_out):.3f} | {spent / step:.2f} s a step", flush=True)


if __name__ == "__main__":
    main()
