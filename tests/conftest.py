"""What many test files share: random weights, and the `slow` marker (`make test-fast` skips it)."""

import os

import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real DeepSpeed ranks in subprocesses (minutes); "
                                       "`make test-fast` leaves these out, `make test` runs them")


def randomize(module: torch.nn.Module, std: float, seed: int | None = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, std²) (seeded unless seed is None): zero-initialised tensors (nanochat's output
    projections, SAM's rel-pos and pos tables) would hide a wrong key mapping and give no gradient at step 0."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


# Run in a fresh interpreter that never imports ocr_vlm: what a user of the export alone has.
_HF_GENERATE = r"""
import json, sys
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
export, inputs, max_new_tokens = sys.argv[1], load_file(sys.argv[2]), int(sys.argv[3])
prompts = json.loads(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
       for p in prompts]
batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")
out = model.generate(**batch, pixel_values=inputs["pixels"], max_new_tokens=max_new_tokens)
texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
assert not any(name.split(".")[0] == "ocr_vlm" for name in sys.modules), "the export needed ocr_vlm"
print(json.dumps({"texts": texts, "prompt_ids": ids}))
"""


def transformers_generate(export, prompts: list[str], pixels: torch.Tensor, max_new_tokens: int, tmp_path) -> dict:
    """Greedy `generate` of an export loaded by transformers (trust_remote_code) in a fresh process, from outside the
    repository: {"texts": one per prompt, "prompt_ids": the chat template's ids}."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({"pixels": pixels.contiguous()}, str(tmp_path / "pixels.safetensors"))
    result = subprocess.run([sys.executable, "-c", _HF_GENERATE, str(export), str(tmp_path / "pixels.safetensors"),
                             str(max_new_tokens), json.dumps(prompts)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
