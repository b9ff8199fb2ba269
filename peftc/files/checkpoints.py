"""Checkpoints and resume: small, atomic, exact, and refused when they belong to another plan.

A checkpoint (Lightning's format, loadable with `torch.load(weights_only=True)`) holds only the
trainable tensors, the optimizer and scheduler state, the loop progress, the data position and
the RNG states, plus `peftc_fingerprint` (the plan's fingerprint) and `peftc_spec`. It is written
to `<output>/checkpoints/last.ckpt` every `trainer.checkpoint_every_n_steps` optimizer steps, after
the last one (so a finished run can train longer) and at the first step boundary after SIGTERM or
Ctrl-C (then the run stops and exits with status 143 or 130). Each write goes to a temp file
beside the target, is fsynced and renamed, so a kill mid-write leaves the previous checkpoint.

Resuming (`resume=<checkpoint or run dir>`) first reads the checkpoint memory-mapped and compares
its spec with the run's: a checkpoint of another plan is refused before the base model or any
tensor is loaded. What does not change what is trained may differ (`RESUMABLE_CHANGES`: a larger
max_steps, the checkpoint interval, the logger). The checkpoint also records the run's command-line
overrides (`peftc_overrides`), which `resume=` replays (peftc.cli.resume). The data order is a function of (seed, epoch) and the sampler skips the batches the
checkpoint already consumed, so a resumed run continues with exactly the batches, dropout masks
and optimizer state an uninterrupted run would have had.
"""

from __future__ import annotations

import math
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, DistributedSampler

from peftc.errors import ConfigError
from peftc.files.atomic import write_file_atomic
from peftc.files.run_dir import CHECKPOINT_DIR

LAST = "last.ckpt"
# What a resumed run may change: how long it trains, how it reports and where, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {
        "trainer.max_steps",
        "trainer.checkpoint_every_n_steps",
        "trainer.logger",
        "trainer.tracker_project",
        "trainer.log_every_n_steps",
        "trainer.progress_bar",
        "resume",
        "output_dir",
        "dry_run",
        "explain",
        "predict_samples",
        "budget.memory_gb",
    }
)


# ---------------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file beside the target, fsync, rename (Lightning stages in memory
    and moves without fsync; Lightning#19970, #21253)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        write_file_atomic(Path(path), lambda fh: torch.save(checkpoint, fh))


class StepCheckpoint(Callback):
    """Save last.ckpt every N optimizer steps and after the last one, and at the next step boundary
    after SIGTERM or a first Ctrl-C (SIGINT); the run then stops, resumable. A second Ctrl-C stops
    at once. (N = 0: only on a signal.)

    While training runs this callback owns both signals: the handler only records the signal,
    which is acted on after the optimizer step, never mid-step or mid-accumulation. (Lightning's
    own SIGTERM handler would raise at the end of any batch, racing the checkpoint, Lightning#21407;
    on Ctrl-C Lightning stops without saving anything.)
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, directory: Path, every_n_steps: int, loader: ResumableLoader | None) -> None:
        self.path = Path(directory) / CHECKPOINT_DIR / LAST
        self.every_n_steps = every_n_steps
        self.loader = loader
        self.interrupted_at: int | None = None
        self.stop_signal: signal.Signals | None = None
        self._seen_step = 0
        self._saved_at: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_handlers()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """A validation check at the step just saved: save again, after it. A resumed run starts
        with the next step and never repeats that check, so the checkpoint must hold what it
        changed (early stopping's count, the best adapter). Runs after those callbacks (fit puts
        this one last). On a stop signal the step-boundary save stands: stopping comes first."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.stop_signal is not None:
            return
        if self._saved_at == trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_handlers()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step
        self.stop_signal = signal.Signals(signum)
        if signum == signal.SIGINT:
            print(
                "\nCtrl-C: stopping after this step with a checkpoint (press Ctrl-C again to stop at once)", flush=True
            )

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.loader is not None:
            self.loader.batches_done = batch_idx + 1
        step = trainer.global_step
        if step == self._seen_step:
            return  # mid gradient accumulation: not a step boundary
        self._seen_step = step
        stop = self.stop_signal is not None
        # The last step too, so `resume=RUN trainer.max_steps=<more>` trains a finished run longer;
        # saved here, at the step boundary (after training ends Lightning's loop state would
        # count the epoch as done, and a resumed run would start a new one).
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if stop or (self.every_n_steps and (step % self.every_n_steps == 0 or last)):
            trainer.save_checkpoint(self.path, weights_only=False)  # the optimizer state too
            self._saved_at = step
        if stop:
            self.interrupted_at = step
            trainer.should_stop = True


# ------------------------------------------------------------------------------------ data
class ResumableSampler(DistributedSampler):
    """DistributedSampler's shuffled order (randperm(n) seeded with seed + epoch, padded and dealt
    out rank::world), with the rank and world size read when iterated: the loader is built before
    the processes join. Being a DistributedSampler, Lightning keeps it instead of wrapping it in
    a second shuffle, so k processes with batch b see the same examples per step as one process
    with batch k*b. After a resume it skips the examples the checkpoint had consumed in that epoch."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__(range(size), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self._skip: tuple[int, int] | None = None  # (epoch, examples of this rank to skip)

    def skip(self, epoch: int, examples: int) -> None:
        self._skip = (epoch, examples)

    def __iter__(self) -> Iterator[int]:
        join_world(self)
        order = list(super().__iter__())
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            order = order[skip[1] :]
        return iter(order)

    def __len__(self) -> int:
        join_world(self)
        return self.num_samples


def join_world(sampler: DistributedSampler) -> None:
    """Give a DistributedSampler built before the processes joined (num_replicas=1) the world it
    runs in now: its rank, the world size and the padded length that follows from them."""
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sampler.num_replicas, sampler.rank = world, rank
    sampler.num_samples = math.ceil(len(sampler.dataset) / world)
    sampler.total_size = sampler.num_samples * world


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (the `_Stateful` protocol)."""

    batches_done = 0  # batches of the current epoch already trained on (set by StepCheckpoint)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_done": int(self.batches_done)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batches_done = int(state["batches_done"])
        self.sampler.skip(int(state["epoch"]), self.batches_done * int(self.batch_size))


# ---------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout), as weights_only-safe plain data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- resuming
def find_checkpoint(value: str) -> Path:
    """The checkpoint a `resume=` value names: a file, or a run directory holding one."""
    path = Path(value).expanduser()
    for candidate in (path, path / CHECKPOINT_DIR / LAST, path / LAST):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "resume",
        value,
        "no checkpoint there",
        f"give a .ckpt file or a run directory holding {CHECKPOINT_DIR}/{LAST}",
    )


def check_resumable(path: Path, spec: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written for another plan, or one the run would not train past. Reads it
    memory-mapped with the safe unpickler: no tensor data is read and nothing is loaded into any model."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "peftc_fingerprint" not in checkpoint:
        raise ConfigError("resume", str(path), "is not a peftc checkpoint (no peftc_fingerprint)")
    changes = spec_changes(checkpoint.get("peftc_spec") or {}, spec)
    if changes:
        raise ConfigError(
            "resume",
            str(path),
            f"was written by a different plan ({changes})",
            "resume with the config that wrote it (resume= restores it; a larger trainer.max_steps, the "
            "checkpoint interval and the logger may change), or start a new run without resume",
        )
    step, last = int(checkpoint.get("global_step") or 0), (spec.get("trainer") or {}).get("max_steps")
    if last is not None and 0 <= last <= step:
        raise ConfigError(
            "trainer.max_steps", last, f"trains no further than the checkpoint, which is at step {step}",
            f"give a larger trainer.max_steps to train longer, e.g. trainer.max_steps={step * 2}",
        )  # fmt: skip


def read_checkpoint(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any unreadable file: torch raises many types here
        raise ConfigError("resume", str(path), f"cannot be read as a checkpoint ({type(exc).__name__})") from exc


def spec_changes(before: Mapping[str, Any], after: Mapping[str, Any], limit: int = 3) -> str:
    """'trainer.lr: 0.003 -> 0.001, ...' for the keys that differ between two plain specs and
    change what a resumed run trains ('' when none do)."""
    flat_before, flat_after = _flatten(before), _flatten(after)
    keys = sorted(k for k in set(flat_before) | set(flat_after) if flat_before.get(k) != flat_after.get(k))
    keys = [k for k in keys if k not in RESUMABLE_CHANGES]
    shown = [f"{k}: {flat_before.get(k)!r} -> {flat_after.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}
