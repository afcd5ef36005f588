"""Run tracking on rank 0: a metrics JSONL that is always written, and Weights & Biases when enabled.

W&B runs offline (files under the run directory, `wandb sync` later) whenever there is no API key or the
environment says so, so a cluster without internet never blocks on a login prompt. The run's config is the resolved
recipe and ds_config; evaluations log under eval/ (with a table of read-back pages) and the export is an artifact.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ocr_vlm.image import load_image


class Tracker:
    def __init__(self, run_dir: str | Path, config: dict, enabled: bool = True, use_wandb: bool = False,
                 project: str = "ocr_vlm", run_name: str = "", resume: bool = False):
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends (after `resume_at` drops what the crashed run logged past its checkpoint).
        self.metrics = open(self.run_dir / "metrics.jsonl", "a" if resume else "w", buffering=1)
        if use_wandb:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "disabled":
                os.environ.setdefault("WANDB_MODE", "offline")
            run_id_file = self.run_dir / "wandb_run_id"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else secrets.token_hex(4)
            run_id_file.write_text(run_id)
            self.wandb = wandb.init(project=project, name=run_name or self.run_dir.name, id=run_id,
                                    resume="allow", dir=str(self.run_dir), config=config)

    def resume_at(self, step: int) -> None:
        """Drop the rows logged after `step`, the checkpoint a run resumes from: a run that crashed after it logged
        those steps again, and the file must hold every step of the logical run exactly once. (W&B, resumed under
        the same run id, ignores steps it already has.)"""
        if not self.enabled:
            return
        path = Path(self.metrics.name)
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        self.metrics.close()
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
        self.metrics = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_predictions(self, step: int, rows: list[dict]) -> None:
        """W&B only: a table of read-back pages (the page, expected and generated text, CER, exact) under
        eval/predictions, to see what the numbers mean."""
        if self.wandb is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=["key", "page", "expected", "generated", "cer", "exact"])
        for r in rows:
            table.add_data(r["key"], wandb.Image(load_image(r["image"])), r["expected"], r["generated"], r["cer"],
                           r["exact"])
        self.wandb.log({"eval/predictions": table}, step=step)

    def log_artifact(self, path: str | Path, name: str, kind: str) -> None:
        """W&B only: a directory (the run's export) as a versioned artifact of the run."""
        if self.wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind)
        artifact.add_dir(str(path))
        self.wandb.log_artifact(artifact)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
