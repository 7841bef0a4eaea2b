"""Rank-0 metric sinks: TensorBoard, a JSONL file beside it, and the progress bar.

Values arrive already all-reduced; this module only writes. On other ranks every method is a no-op,
so the trainer calls it unconditionally.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from mlot_ds import dist


class MetricLog:
    def __init__(self, log_dir: Path, total_steps: int, initial_step: int, recipe_yaml: str, hparams: dict):
        self.enabled = dist.is_rank0()
        self.log_dir = log_dir
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not self.enabled:
            return

        log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events a killed run wrote after its last checkpoint, so a resumed run
        # continues one clean curve instead of overlapping the abandoned tail.
        self.writer = SummaryWriter(str(log_dir), purge_step=initial_step + 1 if initial_step else None)
        self.jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if initial_step == 0:
            self.writer.add_text("recipe", "```yaml\n" + recipe_yaml + "\n```", 0)
            self.writer.add_hparams(hparams, {"hparam/placeholder": 0.0}, run_name=".")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, markdown, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
