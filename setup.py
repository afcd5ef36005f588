from setuptools import find_packages, setup

setup(
    name="ocr_vlm",
    version="0.1.0",
    description="DeepSpeed trainer for nano-DeepSeek-OCR: DeepEncoder (SAM ViT-B + CLIP-L) + nanochat d20 GPT",
    python_requires=">=3.10",
    packages=find_packages(include=["ocr_vlm", "ocr_vlm.*"]),
    package_data={"ocr_vlm": ["assets/*"]},
    install_requires=[
        # torch is pinned in the Makefile's install step: an unpinned torch resolves to a multi-GB CUDA build
        "torch>=2.5",              # scaled_dot_product_attention(enable_gqa=...) in model/gpt.py
        "deepspeed>=0.19.3,<0.20",   # 0.19.3 changed gradient_clipping's default; train.py reads ZeRO internals
                                     # (safe_get_full_grad, universal-checkpoint keys) that minor releases move
        "webdataset>=1.0",
        "braceexpand",
        "pillow>=10",
        "pyspng>=0.1",   # libspng: plain PNGs decode ~1.2x faster than with Pillow, identical pixels (image.py)
        "safetensors>=0.4",
        "tiktoken>=0.7",
        "wandb>=0.17",
        "tqdm",
        "matplotlib",   # the evaluation report's loss curve
        "datasets>=2.14",    # `shards write --hf_dataset`: load_from_disk (Arrow files, nothing unpickled)
        "pyarrow>=14",       # `shards write --hf_dataset`: parquet files
        "pypdfium2>=4",      # `shards write --documents`: PDF pages rendered, text layers read
        "rapidfuzz>=3",      # edit distances for CER/WER/NED and the report's diffs (metrics.py)
        "numpy",
    ],
    # Every command but training (`deepspeed launch/train.py --ds_config ...`, the launcher's entry point).
    entry_points={"console_scripts": [
        "ocr-vlm-shards=ocr_vlm.data.shards:main",
        "ocr-vlm-render=ocr_vlm.data.render:main",
        "ocr-vlm-generate=ocr_vlm.generate:main",
        "ocr-vlm-report=ocr_vlm.report:main",
        "ocr-vlm-export=ocr_vlm.export:main",
        "ocr-vlm-plan=ocr_vlm.plan:main",
        "ocr-vlm-tokenizer=ocr_vlm.tokenizer:main",
        "ocr-vlm-model=ocr_vlm.model.__main__:main",
    ]},
    extras_require={
        "dev": [
            "pytest>=8",
            "transformers>=5.0",   # numerical oracle for SAM, CLIP and NanoChat parity tests; loads the export
            "rustbpe>=0.1",        # trains the shipped tiny tokenizer, as nanochat does
        ],
    },
)
