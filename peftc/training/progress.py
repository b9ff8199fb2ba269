"""Progress while training: Rich's bar on a terminal, plain lines everywhere else (CI, nohup, a
log file), so a long run never goes silent between the plan and `done in`."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


def progress_callback(enabled: bool | None, every: int, stream: TextIO | None = None) -> ProgressBar | None:
    """The progress display for a run: None when turned off (trainer.progress_bar=false); by
    default the bar on a terminal and step lines when stderr is not one."""
    if enabled is False:
        return None
    if enabled or sys.stderr.isatty():
        return StepBar()
    return StepLines(every, stream)


class StepBar(RichProgressBar):
    """Lightning's Rich bar, without 'Epoch 0/-2' for runs bounded by steps (max_epochs=-1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        last_epoch = (self.trainer.max_epochs or 0) - 1
        description = f"Epoch {current_epoch}" + (f"/{last_epoch}" if last_epoch >= 0 else "")
        return f"{description:{len(self.validation_description)}}"


class StepLines(ProgressBar):
    """One line every `every` optimizer steps (and at the last): step, loss, learning rate,
    tokens per second and the time left, on stdout."""

    def __init__(self, every: int, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every = max(1, every)
        self.stream = stream
        self._enabled = True
        self._started = 0.0
        self._tokens = 0
        self._first_step = 0  # a resumed run starts past 0
        self._printed_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._started, self._tokens = time.perf_counter(), 0
        self._first_step = self._printed_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._tokens += tokens_in(batch)
        step, total = trainer.global_step, total_steps(trainer)
        due = step - self._printed_step >= self.every or (total is not None and step >= total)
        if not (self._enabled and trainer.is_global_zero and due and step > self._printed_step):
            return
        self._printed_step = step
        # The finished step's loss (PeftcLightningModule adds up its micro-batches), else this batch's.
        loss = getattr(pl_module, "last_step_loss", None)
        if loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        print(
            self.line(trainer, loss, step, total, step - self._first_step),
            file=self.stream or sys.stdout,
            flush=True,
        )

    def line(self, trainer: Any, loss: Any, step: int, total: int | None, done: int) -> str:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        parts = [f"step {step}/{total}" if total is not None else f"step {step}"]
        if isinstance(loss, torch.Tensor):
            parts.append(f"loss {loss.detach().float().item():.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        parts.append(f"{self._tokens / elapsed:,.0f} tok/s")
        if total is not None and done > 0:
            parts.append(f"eta {format_seconds(elapsed / done * (total - step))}")
        return "  ".join(parts)


def tokens_in(batch: Any) -> int:
    """Tokens a batch trains on: the attention mask's ones, or every input id."""
    if not isinstance(batch, dict):
        return 0
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def total_steps(trainer: Any) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if estimated != float("inf") else None


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
