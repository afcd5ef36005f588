"""How fast the GPT side alone learns to read a line when every vision token already names its character.

    python bench/reading_gpt.py [--steps 1000] [--copy_steps 800] [--lr 1e-2] [--threads 1]   (about 25 min per arm)

The towers' side of reading is what the reading head measures; this bench takes it away. Each page of the line set
(`READING_SETS["line"]`: one line of 4-8 characters at random places) becomes perfect vision tokens: a fixed random
code for each character on the token its centre falls in (`token_cells`, as the reading head is trained), one
background code everywhere else, through a trainable linear map in the projector's place; the mini16 GPT and its
newline/separator embeddings learn to answer "Free OCR." with the line, 28 pages a step, AdamW at `--lr`.

Two arms: the GPT from scratch, as `make read` starts it, and the same GPT first trained `--copy_steps` steps on
text alone to repeat a line back (the user's turn holds the line, the answer repeats it): the copying a pretrained
nanochat arrives with. Printed every 50 steps: held-out loss per answer token and teacher-forced token accuracy
(the end token included; a model that reads nothing gets about 0.15 of the tokens right: the end, and chance).
Not a timing: it measures steps to learn, so it runs the arms one after the other.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from harness import fix_threads
from ocr_vlm import config
from ocr_vlm.data.render import READING_SETS, reading_line, reading_page
from ocr_vlm.data.sample import character_centres
from ocr_vlm.image import token_cells
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import inked
from ocr_vlm.model.vlm import VLM, build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

PROMPT = "<image>\nFree OCR."
PAGES = 28                       # a step's pages: what `make read` packs into a step
LINE = READING_SETS["line"]
BACKGROUND_CODE = 256            # codes 0-255: the byte values' (characters here are ASCII)


def padded(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, loss mask) rows -> right-padded ids and next-token targets (IGNORE_INDEX off the mask)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (tokens, mask) in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        targets[row, :len(tokens) - 1] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(tokens[1:], mask[1:])])
    return ids, targets


class Pages:
    """Line pages as (ids, targets, perfect vision codes)."""

    def __init__(self, cfg: config.VLMConfig, tokenizer: Tokenizer, seed: int):
        self.cfg, self.tokenizer, self.rng = cfg, tokenizer, random.Random(seed)
        generator = torch.Generator().manual_seed(0)
        self.codes = torch.randn(BACKGROUND_CODE + 1, cfg.gpt.n_embd, generator=generator)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, vision = [], []
        for _ in range(n):
            page = reading_page(self.rng, LINE)
            cells = token_cells(character_centres(page.chars, page.text), page.image.size, self.cfg)
            codes = self.codes[BACKGROUND_CODE].repeat(self.cfg.vision_grid ** 2, 1)
            for char, cell in zip(inked(page.text), cells):
                codes[cell] = self.codes[ord(char)]
            rows.append(self.tokenizer.render_sample(PROMPT, page.text, self.cfg.image_tokens))
            vision.append(codes)
        return *padded(rows), torch.stack(vision)

    def copy_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text only: the user's turn holds a line, the answer repeats it."""
        lines = [reading_line(self.rng, self.rng.randint(*LINE.chars), LINE) for _ in range(n)]
        return padded([self.tokenizer.render_conversation([{"role": "user", "content": line},
                                                           {"role": "assistant", "content": line}]) for line in lines])


def answer_loss(model: VLM, ids: torch.Tensor, targets: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    logits = model.gpt.logits(model.gpt.hidden(x)).float()
    supervised = targets != IGNORE_INDEX
    accuracy = (logits.argmax(-1)[supervised] == targets[supervised]).float().mean().item()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX), accuracy


def arm(name: str, copy_steps: int, steps: int, lr: float) -> None:
    cfg = config.mini16()
    tokenizer = Tokenizer.load(MINI_TOKENIZER)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    projector = torch.nn.Linear(cfg.gpt.n_embd, cfg.gpt.n_embd)
    gpt_side = model.component_parameters("gpt") + [model.image_newline, model.view_separator]
    optimizer = torch.optim.AdamW(gpt_side + list(projector.parameters()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    train, held_out = Pages(cfg, tokenizer, seed=1), Pages(cfg, tokenizer, seed=2)
    val = held_out.batch(100)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(1, copy_steps + 1):
        ids, targets = train.copy_batch(PAGES)
        loss, _ = answer_loss(model, ids, targets, model.gpt.embed(ids))
        step(loss)
        if i % 200 == 0:
            print(f"{name}: copy step {i:4d} | loss {loss.item():.3f}", flush=True)
    for i in range(1, steps + 1):
        ids, targets, vision = train.batch(PAGES)
        step(answer_loss(model, ids, targets, model.embed(ids, projector(vision)))[0])
        if i % 50 == 0:
            with torch.no_grad():
                ids, targets, vision = val
                loss, accuracy = answer_loss(model, ids, targets, model.embed(ids, projector(vision)))
            print(f"{name}: step {i:4d} | held-out loss {loss.item():.3f} | teacher-forced accuracy {accuracy:.3f}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="steps on line pages (default %(default)s)")
    p.add_argument("--copy_steps", type=int, default=800, help="the second arm's text-copy steps first (%(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (default %(default)s)")
    p.add_argument("--arm", choices=("scratch", "copy", "both"), default="both")
    args = p.parse_args()
    fix_threads(args.threads)
    if args.arm in ("scratch", "both"):
        arm("from scratch", 0, args.steps, args.lr)
    if args.arm in ("copy", "both"):
        arm(f"after {args.copy_steps} copy steps", args.copy_steps, args.steps, args.lr)


if __name__ == "__main__":
    main()
