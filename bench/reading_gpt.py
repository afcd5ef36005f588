"""How fast the GPT side alone learns to read a line when every vision token already names its character.

    python bench/reading_gpt.py [--arm ...] [--steps 1000] [--copy_steps 800] [--lr 1e-2] [--fixed_map] [--threads 1]
    (about 25 min per arm of 1000 steps)

The towers' side of reading is what the reading head measures; this bench takes it away. Each page of the line set
(`READING_SETS["line"]`: one line of 4-8 characters at random places) becomes perfect vision tokens: a fixed random
code for each character on the token its centre falls in (`token_cells`, as the reading head is trained), one
background code everywhere else, through a trainable linear map in the projector's place (`--fixed_map`: none); the
mini16 GPT and its newline/separator embeddings learn to answer "Free OCR." with the line, 28 pages a step, AdamW at
`--lr`.

Arms: `scratch`, the GPT from scratch; `copy`, the same GPT first trained `--copy_steps` steps on text alone to
repeat a line back (the user's turn holds the line, the answer repeats it): the copying a pretrained nanochat
arrives with; `pointer`, from scratch with the pointer's loss (model/reading.py: where its head looks, and what it
carries from there) added; `pointer_previous`, the pointer with codes that also name the previous character, as the
reading head's second readout trains the real towers to; `pointer_smear`, that with the GPT's smear (`--model.gpt.smear`:
each position's embedding plus a learned share of the one before, so the pointer's query knows the last two tokens);
`pointer_two_back`, codes that also name the character two back; `pointer_smear_two_back`, both, so that the query
for what follows `t t` finds the one token whose code says it follows a `t` that follows a `t`. Printed every 50
steps: held-out loss per answer token and teacher-forced token accuracy (the end token included; a model that reads
nothing gets about 0.15 of the tokens right: the end, and chance), with the pointer the attention its head pays to
the right token (geometric mean over the answer tokens), and the accuracy right after a doubled character (`tt`) on
100 held-out lines that have one: the first-layer pointer's query then holds the same character as one token before,
so it asks for the same token again. At the end, with the pointer, the held-out answer tokens by what their position
writes (the first character, the end, a token of two or more characters, after a character the line had before, any
other): how many the GPT writes wrong and where the pointer's head looks there. Not a timing: it measures steps to
learn; run arms one at a time.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import replace

import torch
import torch.nn.functional as F

from harness import fix_threads
from ocr_vlm import config
from ocr_vlm.data.render import READING_SETS, reading_line, reading_page
from ocr_vlm.data.sample import character_centres, pointer_pairs
from ocr_vlm.image import token_cells
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import POINTER_HEAD, POINTER_LAYER, inked, pointer_loss
from ocr_vlm.model.vlm import VLM, build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

PROMPT = "<image>\nFree OCR."
PAGES = 28                       # a step's pages: what `make read` packs into a step
LINE = READING_SETS["line"]
BACKGROUND_CODE = 256            # codes 0-255: the byte values' (characters here are ASCII)
KINDS = ("the first character", "the end", "a token of two or more characters",   # what an answer position writes
         "after a character the line had before", "any other")


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
    """Line pages as (ids, targets, perfect vision codes); `doubled`: only lines with two like characters side by
    side (about one line in ten), drawn until one comes."""

    def __init__(self, cfg: config.VLMConfig, tokenizer: Tokenizer, seed: int, back: int, doubled: bool = False):
        self.cfg, self.tokenizer, self.rng, self.back = cfg, tokenizer, random.Random(seed), back
        self.doubled = doubled
        generator = torch.Generator().manual_seed(0)
        # codes of a character, then of the one before it and of the one before that (as the head's readouts)
        self.codes = torch.randn(3, BACKGROUND_CODE + 1, cfg.gpt.n_embd, generator=generator)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, targets, vision codes, the pointer's pairs (row, position, vision position, page))."""
        rows, vision, pairs = [], [], []
        for row in range(n):
            page = reading_page(self.rng, LINE)
            while self.doubled and not any(a == b for a, b in zip(page.text, page.text[1:])):
                page = reading_page(self.rng, LINE)
            cells = token_cells(character_centres(page.chars, page.text), page.image.size, self.cfg)
            codes = self.codes[0, BACKGROUND_CODE].repeat(self.cfg.vision_grid ** 2, 1)
            named = [BACKGROUND_CODE] * self.back          # the characters before, nearest first
            for char, cell in zip(inked(page.text), cells):
                codes[cell] = sum(self.codes[k, c] for k, c in enumerate([ord(char)] + named))
                named = ([ord(char)] + named)[:self.back]
            ids, mask = self.tokenizer.render_sample(PROMPT, page.text, self.cfg.image_tokens)
            pairs += [(row, query, key, row) for query, key in
                      pointer_pairs(self.tokenizer, ids, page.text, cells, 0, self.cfg.vision_grid)]
            rows.append((ids, mask))
            vision.append(codes)
        return *padded(rows), torch.stack(vision), torch.tensor(pairs)

    def copy_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text only: the user's turn holds a line, the answer repeats it."""
        lines = [reading_line(self.rng, self.rng.randint(*LINE.chars), LINE) for _ in range(n)]
        return padded([self.tokenizer.render_conversation([{"role": "user", "content": line},
                                                           {"role": "assistant", "content": line}]) for line in lines])


def answer_loss(model: VLM, ids: torch.Tensor, targets: torch.Tensor, x: torch.Tensor,
                pairs: torch.Tensor | None = None,
                after_double: bool = False) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """(answer loss, teacher-forced accuracy, the pointer's loss, the attention its head pays to the character's token
    (geometric mean): 0 and nan without `pairs`); `after_double`: the accuracy only where the token just read
    repeats the one before it, the position that must write what follows the pair."""
    if pairs is None:
        h, pointer, attention = model.gpt.hidden(x), x.new_zeros(()), math.nan
    else:
        h, attended = model.gpt.hidden(x, attention=(POINTER_LAYER, POINTER_HEAD, pairs[:, :3]))
        pointer, attention = pointer_loss(model.gpt, attended, targets, pairs, len(ids)), \
            attended[0].gather(1, pairs[:, 2:3]).mean().exp().item()
    logits = model.gpt.logits(h).float()
    supervised = targets != IGNORE_INDEX
    if after_double:
        supervised[:, 1:] &= ids[:, 1:] == ids[:, :-1]
        supervised[:, 0] = False
    accuracy = (logits.argmax(-1)[supervised] == targets[supervised]).float().mean().item()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return loss, accuracy, pointer, attention


def errors_by_kind(model: VLM, tokenizer: Tokenizer, ids: torch.Tensor, targets: torch.Tensor, x: torch.Tensor,
                   pairs: torch.Tensor) -> None:
    """Print the held-out answer tokens by what their position writes: how many, how many the GPT writes wrong
    (teacher-forced), and the attention the pointer's head pays to the right token there (geometric mean)."""
    h, (log_attention, _) = model.gpt.hidden(x, attention=(POINTER_LAYER, POINTER_HEAD, pairs[:, :3]))
    rows, positions = pairs[:, 0], pairs[:, 1]
    wanted = targets[rows, positions]
    wrong = model.gpt.logits(h).argmax(-1)[rows, positions] != wanted
    kinds = []
    for row, position, token in zip(rows.tolist(), positions.tolist(), wanted.tolist()):
        written = ids[row, :position + 1].tolist()
        answer = written[written.index(tokenizer.assistant_start_id) + 1:]
        kinds.append(KINDS[0] if not answer else KINDS[1] if token == tokenizer.assistant_end_id else
                     KINDS[2] if len(tokenizer.decode([token])) > 1 else KINDS[3] if answer[-1] in answer[:-1] else
                     KINDS[4])
    for kind in KINDS:
        at = torch.tensor([k == kind for k in kinds])
        print(f"{kind:>38}: {int(at.sum()):4d} tokens, {int(wrong[at].sum()):3d} wrong, attention on the right "
              f"token {log_attention[at].mean().exp().item():.2f}", flush=True)


def arm(name: str, copy_steps: int, steps: int, lr: float, pointer: bool, back: int, smear: bool,
        fixed_map: bool) -> None:
    cfg = config.mini16()
    cfg = replace(cfg, gpt=replace(cfg.gpt, smear=smear))     # the GPT's own smear (model/gpt.py)
    tokenizer = Tokenizer.load(MINI_TOKENIZER)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    projector = torch.nn.Identity() if fixed_map else torch.nn.Linear(cfg.gpt.n_embd, cfg.gpt.n_embd)
    gpt_side = model.component_parameters("gpt") + [model.image_newline, model.view_separator]
    optimizer = torch.optim.AdamW(gpt_side + list(projector.parameters()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    train, held_out = Pages(cfg, tokenizer, 1, back), Pages(cfg, tokenizer, 2, back)
    val, doubled = held_out.batch(100), Pages(cfg, tokenizer, 3, back, doubled=True).batch(100)

    def inputs(ids: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return model.embed(ids, projector(vision))

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(1, copy_steps + 1):
        ids, targets = train.copy_batch(PAGES)
        loss, *_ = answer_loss(model, ids, targets, model.gpt.embed(ids))
        step(loss)
        if i % 200 == 0:
            print(f"{name}: copy step {i:4d} | loss {loss.item():.3f}", flush=True)
    for i in range(1, steps + 1):
        ids, targets, vision, pairs = train.batch(PAGES)
        loss, _, pointing, _ = answer_loss(model, ids, targets, inputs(ids, vision), pairs if pointer else None)
        step(loss + pointing)
        if i % 50 == 0:
            with torch.no_grad():
                ids, targets, vision, pairs = val
                loss, accuracy, _, attention = answer_loss(model, ids, targets, inputs(ids, vision), pairs)
                ids, targets, vision, _ = doubled
                _, after, *_ = answer_loss(model, ids, targets, inputs(ids, vision), after_double=True)
            print(f"{name}: step {i:4d} | held-out loss {loss.item():.3f} | teacher-forced accuracy {accuracy:.3f} | "
                  f"attention on the character's token {attention:.2f} | after a doubled character "
                  f"{after:.3f}", flush=True)
    if pointer:
        ids, targets, vision, pairs = val
        with torch.no_grad():
            errors_by_kind(model, tokenizer, ids, targets, inputs(ids, vision), pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="steps on line pages (default %(default)s)")
    p.add_argument("--copy_steps", type=int, default=800, help="the second arm's text-copy steps first (%(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (default %(default)s)")
    p.add_argument("--arm", choices=ARMS, default="pointer_previous")
    p.add_argument("--fixed_map", action="store_true", help="the codes reach the GPT as they are, no trained linear map")
    args = p.parse_args()
    fix_threads(args.threads)
    copy_steps, pointer, back, smear = ARMS[args.arm]
    arm(args.arm, copy_steps * args.copy_steps, args.steps, args.lr, pointer, back, smear, args.fixed_map)


ARMS = {  # name: (copy steps first (x --copy_steps), the pointer's loss, characters before its own a code names, smear)
    "scratch": (0, False, 0, False),
    "copy": (1, False, 0, False),
    "pointer": (0, True, 0, False),
    "pointer_previous": (0, True, 1, False),
    "pointer_smear": (0, True, 1, True),
    "pointer_two_back": (0, True, 2, False),
    "pointer_smear_two_back": (0, True, 2, True),
}


if __name__ == "__main__":
    main()
