# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a GPU node install your CUDA torch first and run `pip install -e .` instead.
TORCH  ?= torch==2.13.0

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
# DeepSpeed JIT-builds a C++ op on first use; one fixed cache keeps that a one-off cost.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup test test-fast demo read
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

# pytest exits 5 when it collects nothing: an empty suite must fail loudly, not pass quietly.
# `make test` is the whole suite (what CI runs); `make test-fast` leaves out the tests marked slow (DeepSpeed runs).
test: setup
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: setup
	@$(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; exit $$rc

# The tier-1 demo: the mini preset overfits the 10 shipped pages with 2 DeepSpeed CPU ranks (ZeRO-2, fp32),
# then reads them back (runs/demo/eval/report.html).
DEMO_ARGS := --output_dir=runs/demo --steps=200 --global_batch=4 --micro_batch=1 --data.seq_len=512 \
	--lr=3e-3 --min_lr_ratio=0.1 --warmup_steps=10 --checkpointing= --data.num_workers=1 --data.shuffle_buffer=10 \
	--log_every=10 --freeze=sam,clip --val_every=100 --val_shards=shards/tier1 --val_read=10 --val_read_tokens=200 \
	--wandb=true
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json $(DEMO_ARGS)
	$(PY) -m ocr_vlm.report --checkpoint runs/demo/export --shards shards/tier1 --out runs/demo/eval \
		--max_new_tokens 200

# Learning to read: random-string pages (ocr_vlm.data.render reading) trained from scratch with 2 DeepSpeed CPU ranks.
# What makes it learn (ocr_vlm/model/reading.py): 16x16 vision tokens (mini16), about a character each; the reading
# head, trained per token on the rendered characters' boxes (each token's last character and the two before), gives the
# towers a gradient of their own; the vision norm keeps them from collapsing under the GPT's loss; the pointer trains
# one GPT head to look at the next character it writes (and at the image's end when none is left) and to carry what it
# finds there to the output; and the reading code hands the GPT what the head names. It trains on pages of up to eight
# lines of 4-10 of the held-out set's characters (the towers' code forms by the characters in a step, so 8 fuller pages
# a step), with nanochat's optimizer: Muon on every hidden matrix, towers' and GPT's alike (the code forms several times
# sooner than under AdamW, README #muon), AdamW on the rest, and the lr falling in a straight line to zero over the last
# two thirds of the steps (README #warmdown); the GPT's smear and the head's two-back readout let the pointer tell a
# repeated character's two places apart.
# The held-out pages come from another seed, so the model has never seen them; runs/read/eval/report.html holds their
# CER, and the run's metrics.jsonl the learning curve (image gap and CER by minutes and pages seen).
# READ_SET=page (1-4 lines of 4-16 characters with spaces, 16-28 px, three fonts) first trains that line model
# (runs/read/line), then goes on from its weights on such pages for READ_PAGE_STEPS: the towers' code forms on the
# larger glyphs, and the page stage starts from it (at its step 500 the CER a run from scratch has at step 2,000).
# The page stage also tells the GPT where on the page its pointer read each character (reading_place, its maps
# starting at zero on the line model's weights; each token is told where the pointer looked most when it was written,
# in training as in generation): it loses its place between lines less often.
# Measured end to end from a fresh clone (fp32 on a 2-core host without bf16): held-out CER 0.090 after 119 minutes
# of training, 44 of them the line stage (README #the-issues-targets); 0.135 told the true places, 0.18 without.
# Both stages save every 500 steps: READ_RESUME=true goes on with an interrupted `make read` where it stopped (each
# stage's rendered pages kept, training from its last checkpoint); without it, runs/read starts afresh.
READ_SET        ?= line
READ_TRAIN_SET  ?= $(if $(filter line page,$(READ_SET)),dense,$(READ_SET))
READ_PAGES      ?= 26000
READ_STEPS      ?= 2900
READ_PAGE_STEPS ?= 5500
READ_RESUME     ?= false
# bf16 where this CPU computes it natively (AVX512-BF16 or AMX; 1.3x a step here, README #bf16), fp32 elsewhere, where
# bf16 is emulated and several times slower. READ_BF16=false keeps fp32 anyway.
READ_BF16       ?= $(if $(shell grep -s -m1 -E -o 'avx512_bf16|amx_bf16' /proc/cpuinfo),true,false)
READ_ARGS := --preset=mini16 --global_batch=2 --micro_batch=1 --data.seq_len=1536 --data.num_workers=1 \
	--data.shuffle_buffer=500 --optimizer=muon --muon_lr=0.01 --lr=3e-3 --vision_lr_scale=1 --warmup_steps=10 \
	--checkpointing= --schedule=warmdown --warmdown_ratio=0.66 \
	--model.vision_norm=true --model.reading_head=true --model.reading_pointer=true --model.reading_code=true \
	--model.gpt.smear=true --model.reading_back=2 --reading_weight=1 --log_every=50 --save_every=500 --resume=auto
# $(call read_stage,DIR,TRAIN_SET,HELDOUT_SET,STEPS,VAL_TOKENS,REPORT_TOKENS,EXTRA): render the stage's training
# pages (seed 1) and 200 held-out ones (seed 2) unless they are there (a set's directory appears whole, with its
# index.json), train on them into DIR (reading 100 held-out pages back every 250 steps, at most VAL_TOKENS tokens
# each), and report on all 200 (DIR/eval; room enough to show a runaway answer).
define read_stage
	test -f $(1)/data/train/index.json || \
		$(PY) -m ocr_vlm.data.render reading --set $(2) --n $(READ_PAGES) --seed 1 --out $(1)/data/train
	test -f $(1)/data/heldout/index.json || \
		$(PY) -m ocr_vlm.data.render reading --set $(3) --n 200 --seed 2 --out $(1)/data/heldout
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --ds_config runs/read/ds_config.json $(READ_ARGS) \
		--output_dir=$(1) --data.shards=$(1)/data/train --val_shards=$(1)/data/heldout --steps=$(4) \
		--val_every=250 --val_read=100 --val_read_tokens=$(5) $(7)
	$(PY) -m ocr_vlm.report --checkpoint $(1)/export --shards $(1)/data/heldout --out $(1)/eval \
		--max_new_tokens $(6)
endef
read: setup
ifneq ($(READ_RESUME),true)
	rm -rf runs/read
endif
	mkdir -p runs/read
	$(PY) -c 'import json; c = json.load(open("ds_configs/zero2.json")); c["bf16"]["enabled"] = json.loads("$(READ_BF16)"); \
		json.dump(c, open("runs/read/ds_config.json", "w"), indent=2)'
ifeq ($(READ_SET),page)
	$(call read_stage,runs/read/line,$(READ_TRAIN_SET),line,$(READ_STEPS),24,80)
	$(call read_stage,runs/read,page,page,$(READ_PAGE_STEPS),100,120,\
		--init=ocr_vlm=runs/read/line/export/model.safetensors --model.reading_place=true)
else
	$(call read_stage,runs/read,$(READ_TRAIN_SET),$(READ_SET),$(READ_STEPS),24,80)
endif
