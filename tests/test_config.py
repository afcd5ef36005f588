"""Config presets, validation messages that name the field, and typed --key=value overrides."""

import pytest

from ocr_vlm import cli, config
from ocr_vlm.config import ConfigError, GPTConfig, VLMConfig
from ocr_vlm.schedule import lr_multiplier


def test_d20_is_ten_heads_of_128():
    gpt = config.d20().gpt
    assert (gpt.n_head, gpt.head_dim, gpt.n_embd, gpt.n_layer) == (10, 128, 1280, 20)


def test_overrides_are_typed_and_copy():
    base = config.mini()
    cfg = cli.with_args(base, ["--gpt.n_layer=2", "--sam.global_attn_indexes=0,2", "--image_resize=resize"])
    assert (cfg.gpt.n_layer, cfg.sam.global_attn_indexes, cfg.image_resize) == (2, (0, 2), "resize")
    assert base.gpt.n_layer == 4


@pytest.mark.parametrize("override, field", [
    (["--gpt.n_head=3"], "gpt.n_embd"),                     # 128 not divisible by 3
    (["--gpt.bogus=1"], "--gpt.bogus"),                     # unknown key
    (["--image_size=250"], "image_size"),                   # not a multiple of patch * 4
    (["--gpt.n_layer=two"], "gpt.n_layer"),                 # ill-typed
    (["--clip.width=96"], "clip.width"),                    # must equal net_3's channels
    (["--sam.global_attn_indexes=7"], "sam.global_attn_indexes"),
    (["--gpt"], "--gpt"),                                   # not key=value
])
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cli.with_args(config.mini(), override)


def test_round_trip_through_dict():
    cfg = config.mini()
    assert config.from_dict(VLMConfig, config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="heads"):
        config.from_dict(GPTConfig, {"heads": 16})


def test_unknown_preset_and_mode():
    with pytest.raises(ConfigError, match="preset"):
        config.preset("d32")
    with pytest.raises(ConfigError, match="mode"):
        config.d20().with_mode("huge")
    with pytest.raises(ConfigError, match="mode"):
        cli.train_config(["--mode=huge"])


def test_preset_stage_and_mode_choose_defaults_before_the_other_keys():
    cfg = cli.train_config(["--model.image_size=512", "--mode=gundam", "--preset=d20", "--stage=2",
                            "--data.text_shards=t"])
    assert (cfg.preset, cfg.stage, cfg.mode, cfg.lr, cfg.schedule, cfg.freeze) == ("d20", 2, "gundam", 3e-5, "step",
                                                                                   ("sam",))
    assert (cfg.data.seq_len, cfg.model.gpt.sequence_len, cfg.data.text_ratio) == (8192, 8192, 0.1)
    assert (cfg.model.image_size, cfg.model.tile_size, cfg.model.gpt.n_layer) == (512, 640, 20)   # the key wins
    assert cli.train_config([]).warmup_steps == cli.train_config(["--stage=2", "--data.text_shards=t"]).warmup_steps


@pytest.mark.parametrize("args, field", [
    (["--data.seq_len=8192"], "data.seq_len"),               # above the model's context (stage 1: 4096)
    (["--data.batch_rows=4"], "--data.batch_rows"),          # rows per micro-batch are micro_batch, set once
    (["--stage=3"], "stage"),
    (["--freeze=towers"], "freeze"),
    (["--optimizer=sgd"], "optimizer"),
    (["--optimizer=muon", "--muon_lr=0"], "muon_lr"),
    (["--schedule=warmdown", "--warmdown_ratio=0"], "warmdown_ratio"),
])
def test_bad_recipes_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cli.train_config(args)


def test_warmdown_holds_the_peak_then_falls_linearly_to_the_floor():
    cfg = cli.train_config(["--steps=100", "--warmup_steps=10", "--schedule=warmdown", "--warmdown_ratio=0.4",
                            "--min_lr_ratio=0.1"])
    factors = [lr_multiplier(step, cfg) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0        # warmup
    assert set(factors[10:61]) == {1.0}                                   # the peak until 40 steps are left
    falls = [a - b for a, b in zip(factors[60:], factors[61:])]
    assert falls == pytest.approx([0.9 / 40] * 39)                        # a straight line ...
    assert factors[-1] == pytest.approx(0.1 + 0.9 / 40)                  # ... whose next point is the floor


def test_help_lists_every_key_with_its_default_and_a_doc(capsys):
    from ocr_vlm.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key, value, doc in cli.keys(cli.train_config([])):
        assert doc, key
        assert f"--{key}={cli.show(value)}" in out and doc in out, key
    assert "--stage=2 changes: " in out and "lr=3e-05" in out
    assert "--preset=mini16 changes: " in out and "model.sam.patch_size=4" in out
