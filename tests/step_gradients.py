"""One optimizer step of the real trainer on four fixed rows, run by tests/test_loss_weighting.py under the deepspeed
launcher: each rank takes its share of the rows as `gas` micro-batches, and rank 0 saves every trainable
parameter's gradient (taken before the update, gathered over ZeRO-2's partitions) and the step's logged losses.

    deepspeed --num_gpus N tests/step_gradients.py --out OUT.pt --micro_batch=M --global_batch=4 [--key=value ...]
"""

import argparse
import dataclasses
from collections import Counter

import torch
import torch.distributed as torch_dist
from deepspeed.utils import safe_get_full_grad

from ocr_vlm import cli, dist, train
from ocr_vlm.data.loader import READING_KEYS, Loader
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.tokenizer import MINI_TOKENIZER

SUPERVISED = [3, None, None, None]     # row 0 keeps 3 supervised tokens; the others their own (85, 40, 32)
# concatenated row after row; the pointer's pairs are renumbered (`stack`)
TENSORS = ("input_ids", "targets", "position_ids", "doc_ids", "pixel_values", "tile_values", "tile_grids",
           *(key for key in READING_KEYS if key != "pointer"))


def rows(cfg) -> list[dict]:
    """The same four one-row batches on every rank, with deliberately unequal supervised-token counts."""
    data = dataclasses.replace(cfg.data, num_workers=0)
    stream = iter(Loader(data, cfg.model, MINI_TOKENIZER, 0, 1))
    out = []
    for keep in SUPERVISED:
        batch = next(stream)
        if keep is not None:
            supervised = (batch["targets"] != IGNORE_INDEX).nonzero(as_tuple=True)
            batch["targets"][supervised[0][keep:], supervised[1][keep:]] = IGNORE_INDEX
            batch["counters"]["target_tokens"] = keep
        out.append(batch)
    return out


def stack(batches: list[dict]) -> dict:
    """Rows of one-row batches as one micro-batch (images and reading targets stay in row order)."""
    out = {k: torch.cat([b[k] for b in batches]) for k in TENSORS}
    # the pointer's pairs name their row and page: batch i's are row i's, after the pages of the batches before it
    pages = torch.tensor([0] + [len(b["pixel_values"]) for b in batches]).cumsum(0)
    out["pointer"] = torch.cat([b["pointer"] + torch.tensor([i, 0, 0, int(pages[i])]) for i, b in enumerate(batches)])
    out["counters"] = dict(sum((Counter(b["counters"]) for b in batches), Counter()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args()
    out = args.out
    dist.init()
    cfg = cli.train_config([*overrides, "--data.seq_len=256", "--checkpointing=", f"--output_dir={out}.run"])
    trainer = train.Trainer(cfg, "ds_configs/zero2.json")
    # nanochat zero-initialises lm_head and every output projection, so at step 1 most of the model gets no
    # gradient: the same seeded random values on every rank give every parameter one.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05 + p)
    mine = rows(cfg)[trainer.rank::trainer.world]
    micro = [stack(mine[i * cfg.micro_batch:(i + 1) * cfg.micro_batch]) for i in range(trainer.gas)]

    def gradients() -> dict:
        return {n: safe_get_full_grad(p).clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    sums, counters, _, grads = trainer.train_step(micro, iter(()), gradients)
    metrics = trainer._log(sums, 0.0, counters, 0, {}, 1.0)
    if trainer.rank == 0:
        torch.save({"grads": grads, "loss": metrics["loss"], "reading_loss": metrics["reading_loss"],
                    "target_tokens": counters["target_tokens"]}, out)
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
