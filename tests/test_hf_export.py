"""The export leaves the repo: transformers loads it (trust_remote_code, in a fresh process that never imports
ocr_vlm) and greedy `generate` returns exactly our Generator's text, left-padded batch included."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from ocr_vlm import config, hf_export
from ocr_vlm.generation import Generator
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER
from ocr_vlm.weights import load_export, save_export
from conftest import randomize, transformers_generate

PROMPTS = ["<image>\nFree OCR.", "<image>\nRead the text in the image, line by line."]   # two lengths: left padding


def pages(n: int, side: int) -> torch.Tensor:
    torch.manual_seed(1)
    return (torch.rand(n, 3, side, side) * 255).to(torch.uint8)


def test_transformers_generate_equals_our_generator(tmp_path):
    torch.manual_seed(0)
    # with the reading code, generation runs the vision norm and the reading head too; with the smear, transformers'
    # cache carries each row's last input embedding; with reading_place, where its pointer looked
    mini = config.mini()
    cfg = dataclasses.replace(mini, vision_norm=True, reading_head=True, reading_code=True, reading_back=2,
                              reading_pointer=True, reading_place=True, gpt=dataclasses.replace(mini.gpt, smear=True))
    save_export(randomize(build_model(cfg), 0.3, seed=0), tmp_path / "export", MINI_TOKENIZER)
    model, tokenizer = load_export(tmp_path / "export")
    pixels = pages(2, model.cfg.image_size)
    ours = Generator(model, tokenizer).generate(PROMPTS, pixels, max_new_tokens=24)
    theirs = transformers_generate(tmp_path / "export", PROMPTS, pixels, 24, tmp_path)
    assert theirs["texts"] == ours and len(set(ours)) == 2 and all(ours)
    # the export's chat template renders prompts as our tokenizer does
    assert theirs["prompt_ids"] == [tokenizer.render_prompt(p, model.cfg.image_tokens) for p in PROMPTS]


def test_export_ships_generated_code_and_hf_metadata(tmp_path):
    model = build_model(config.mini(), device="meta")
    save_export(model, tmp_path, MINI_TOKENIZER, state_dict={k: torch.zeros(v.shape) for k, v in
                                                            model.state_dict().items()})
    for module, name in hf_export.REMOTE_CODE.items():
        code = (tmp_path / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import) ocr_vlm", code, re.M), name      # made relative
    source = (Path(hf_export.__file__).parent / "model" / "gpt.py").read_text()    # the source itself, not a copy
    assert (tmp_path / "gpt.py").read_text().endswith(source.replace("from ocr_vlm.config import", "from .vlm_config "
                                                      "import").replace("from ocr_vlm.model.layers", "from .layers"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ocr_vlm" and cfg["auto_map"]["AutoModelForCausalLM"].endswith("OcrVlmForCausalLM")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    tokenizer = load_export(tmp_path)[1]
    assert generation["eos_token_id"] == tokenizer.assistant_end_id
    assert tokenizer.image_id in generation["suppress_tokens"] and tokenizer.assistant_end_id not in \
        generation["suppress_tokens"]


def test_old_exports_still_load(tmp_path):
    """Before the transformers layout: config.json was the VLMConfig and tensors had no prefix."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(config.mini())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(model.cfg)))
    (tmp_path / "tokenizer.json").write_text(MINI_TOKENIZER.read_text())
    loaded, _ = load_export(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
