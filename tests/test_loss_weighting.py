"""The loss is weighted per token across micro-batches and ranks: one optimizer step's gradient is that of the mean
token loss over the whole global batch, however its rows are split. Real DeepSpeed ranks on CPU, fp32."""

import sys

import pytest
import torch

from test_train import BIN, free_port, run

ARGS = ["--model.reading_head=true", "--reading_weight=0.1", "--global_batch=4"]


def step(out, ranks: int, micro_batch: int) -> dict:
    run([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
         "tests/step_gradients.py", f"--out={out}", *ARGS, f"--micro_batch={micro_batch}"])
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_by_two_micro_batches_give_the_one_micro_batch_gradient(tmp_path):
    """Rows with 3, 85, 40 and 32 supervised tokens: as one 4-row micro-batch on one rank, and as 2 ranks x 2
    accumulated one-row micro-batches. A per-micro-batch mean would weigh row 0's 3 tokens like row 1's 85."""
    whole = step(tmp_path / "one.pt", ranks=1, micro_batch=4)
    split = step(tmp_path / "two.pt", ranks=2, micro_batch=1)
    assert whole["target_tokens"] == 3 + 85 + 40 + 32     # the same rows either way
    assert abs(whole["loss"] - split["loss"]) < 1e-6 and abs(whole["reading_loss"] - split["reading_loss"]) < 1e-6
    assert whole["grads"].keys() == split["grads"].keys()
    scale = max(g.abs().max().item() for g in whole["grads"].values())
    diff = max((whole["grads"][n] - split["grads"][n]).abs().max().item() for n in whole["grads"])
    print(f"gradient max |diff| {diff:.2e} (largest gradient element {scale:.2e})", file=sys.stderr)
    assert all(g.abs().sum() > 0 for g in whole["grads"].values())      # every parameter's gradient is compared
    assert diff < 1e-6 * max(scale, 1.0)
