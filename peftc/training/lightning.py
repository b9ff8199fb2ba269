"""Training with Lightning: the LightningModule around a PeftcModel, and `fit`.

The module optimizes only trainable parameters (AdamW), logs train/val metrics, adds the
method's extra loss and callbacks, and keeps checkpoints small: only trainable tensors (and
optimizer state) are written, never the frozen base. Checkpointing, resume and SIGTERM
handling live in peftc.files.checkpoints.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from peftc import methods, quant, tasks
from peftc.config.compose import RUN_OVERRIDES
from peftc.errors import ConfigError, RunInterrupted, TrainingDiverged
from peftc.files.checkpoints import (
    AtomicCheckpointIO,
    ResumableLoader,
    StepCheckpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    spec_changes,
)
from peftc.training.loaders import EvaluationSampler
from peftc.training.progress import progress_callback
from peftc.training.step_loss import step_weight, take_step_terms
from peftc.training.trackers import make_logger, trackers_closed

if TYPE_CHECKING:
    from peftc.planning.plan import Plan
    from peftc.runtime.model import PeftcModel
    from peftc.tasks.base import Task


class PeftcLightningModule(L.LightningModule):
    def __init__(self, model: PeftcModel, task: Task, plan: Plan, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.plan = plan
        self.tokenizer = tokenizer  # for tasks scored on generated text
        self.method = methods.get(plan.method)
        self.strict_loading = False  # checkpoints hold trainable tensors only
        self._totals: dict[str, float] = defaultdict(float)
        self._step_loss: torch.Tensor | float = 0.0  # the current step's micro-batch losses, summed
        self.last_step_loss: torch.Tensor | None = None  # the last finished step's loss

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tags = take_step_terms(batch)
        loss = self.task.training_loss(self.model, batch, self.plan.spec.task)
        if tags is not None:  # the step's loss: a mean over all of its terms (step_loss.py)
            loss = loss * step_weight(*tags, self.trainer)
        extra = self.method.extra_loss(self.model, self.plan.adapter_name)
        if extra is not None:
            self.log("train_extra_loss", extra.detach(), on_step=True)
            loss = loss + extra
        self._step_loss = self._step_loss + loss.detach()
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Log the step's loss once its micro-batches are done (the ranks' shares averaged: each
        is weighed by the number of ranks, step_loss.py), as `train_loss` and `last_step_loss`."""
        value, self._step_loss = self._step_loss, 0.0
        if not isinstance(value, torch.Tensor):
            return
        # Lightning divides each micro-batch's loss by the batches per step: those shares add up
        # to the step's loss.
        value = value / self.trainer.accumulate_grad_batches
        if self.trainer.world_size > 1:
            value = self.trainer.strategy.reduce(value, reduce_op="mean")
        self.last_step_loss = value
        self.log("train_loss", value, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Checked at the logging interval, where the loss is read anyway (a check every step
        # would make the GPU wait for each step's loss).
        step = self.trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        due = step % max(1, self.trainer.log_every_n_steps) == 0 and isinstance(loss, torch.Tensor)
        if due and not torch.isfinite(loss.detach()).item():
            raise TrainingDiverged(f"the training loss is {loss.item()} at step {step}")

    def on_validation_epoch_start(self) -> None:
        self._totals = defaultdict(float)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        spec = self.plan.spec.task
        rows = _batch_size(batch)
        counted = self._rows_to_count(batch_idx, rows)
        if 0 < counted < rows:
            batch = {key: value[:counted] for key, value in batch.items()}
        # A batch of the sampler's padding only still runs (a sharded strategy's ranks gather
        # each layer's parameters together in every forward) and still names every sum, at zero:
        # the ranks reduce the sums together, key by key.
        stats = self.task.validation_stats(self.model, batch, spec)
        if self.tokenizer is not None:
            stats.update(self.task.generation_stats(self.model, batch, spec, self.tokenizer))
        for key, value in stats.items():
            self._totals[key] += float(value) if counted else 0.0

    def _rows_to_count(self, batch_idx: int, rows: int) -> int:
        """How many of this validation batch's rows are examples of this rank rather than the
        padding EvaluationSampler repeats so that every rank runs as many batches."""
        loader = self.trainer.val_dataloaders
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, EvaluationSampler):
            return rows
        return max(0, min(rows, sampler.examples_of_this_rank - batch_idx * loader.batch_size))

    def on_validation_epoch_end(self) -> None:
        totals = self._totals
        if self.trainer.world_size > 1:
            keys = sorted(totals)
            stacked = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device)
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
            totals = dict(zip(keys, stacked.tolist()))
        # Every rank logs the same summed value (sync_dist would only average equal numbers).
        for key, value in self.task.metrics(totals).items():
            self.log(key, value, prog_bar=True)

    def configure_optimizers(self) -> Any:
        spec = self.plan.spec.trainer
        optimizer = torch.optim.AdamW(
            decay_groups(self.model, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas), weight_decay=0.0
        )
        total = max(self.trainer.estimated_stepping_batches, 1)
        schedule = lr_schedule(spec.scheduler, spec.warmup_steps, int(total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["peftc_fingerprint"] = self.plan.fingerprint
        checkpoint["peftc_adapter_fingerprint"] = self.plan.adapter_fingerprint
        checkpoint["peftc_spec"] = self.plan.spec.to_dict()
        checkpoint["peftc_overrides"] = list(RUN_OVERRIDES.get() or ()) or None
        checkpoint["peftc_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before loading any state into the module: refuse a foreign plan.
        changes = spec_changes(checkpoint.get("peftc_spec") or {}, self.plan.spec.to_dict())
        if "peftc_fingerprint" not in checkpoint or changes:
            raise ConfigError("resume", None, f"the checkpoint was written by a different plan ({changes})")
        if "peftc_rng" in checkpoint:
            set_rng_state(checkpoint["peftc_rng"])


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weight decay on matrices only. Biases, norm weights and the
    scaling vectors of IA3, VeRA and DoRA's magnitude are 1-D, and decay would pull them to 0 (a
    norm or an IA3 vector starts at 1): the HF Trainer leaves biases and norms out, LitGPT every
    1-D parameter. One group when there is no decay (checkpoints of earlier runs load)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return [{"params": params, "weight_decay": 0.0}]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_schedule(kind: str, warmup: int, total: int) -> Any:
    """Multiplier of the peak learning rate at each optimizer step (0-based). Warm-up gives step k
    (k + 1) / warmup: the first step already trains and the last warm-up step is at the peak
    (transformers' schedulers give k / warmup, a first step at lr 0). The decay after warm-up is
    transformers' linear or (half-cycle) cosine one."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0])


def build_trainer(plan: Plan, output_dir: Path, callbacks: list[Any], resumed_at: int | None = None) -> L.Trainer:
    """The Lightning Trainer for a plan (checkpoints only through peftc's StepCheckpoint);
    `resumed_at`: the step of the checkpoint a resumed run starts from."""
    spec = plan.spec.trainer
    progress = progress_callback(spec.progress_bar, spec.log_every_n_steps)
    return L.Trainer(
        accelerator=spec.accelerator,
        devices=spec.devices,
        strategy=spec.strategy,
        num_nodes=spec.num_nodes,
        precision=spec.precision,
        max_steps=spec.max_steps,
        max_epochs=spec.max_epochs if spec.max_epochs is not None else -1,
        logger=make_logger(plan.spec, output_dir, resumed_at),
        callbacks=[*callbacks, progress] if progress is not None else callbacks,
        enable_checkpointing=False,
        enable_progress_bar=progress is not None,
        enable_model_summary=False,
        log_every_n_steps=spec.log_every_n_steps,
        gradient_clip_val=spec.gradient_clip_val,
        accumulate_grad_batches=spec.accumulate_grad_batches,
        val_check_interval=spec.val_check_interval,
        check_val_every_n_epoch=None if isinstance(spec.val_check_interval, int) else 1,
        limit_val_batches=spec.limit_val_batches,
        num_sanity_val_steps=0,
        deterministic=spec.deterministic,
        inference_mode=quant.get(plan.quant).inference_mode,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
    )


def quiet_lightning() -> None:
    """Keep the terminal for the plan, the progress bar and the metrics: drop Lightning's
    banner lines (accelerator report, cloud-logging tips) and a deprecation it raises itself."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # "Initializing distributed: GLOBAL_RANK: r, MEMBER: ..." once per rank (twice on rank 0).
    logging.getLogger("lightning.fabric.utilities.distributed").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").propagate = False
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Validation metrics are summed over the ranks before they are logged (on_validation_epoch_end).
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)`")
    # A small dataset has fewer batches per epoch than log_every_n_steps: logging still happens
    # every n global steps, across epochs, so the warning only alarms.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")


def warn_if_steps_stop_before_epochs(spec: Any, batches_per_epoch: int) -> None:
    """Training stops at trainer.max_steps or trainer.max_epochs, whichever comes first (as in
    Lightning), so `trainer.max_epochs=3` alone, the HF Trainer's num_train_epochs, would stop at
    the default max_steps, perhaps inside the first epoch: say so, and what trains by epochs."""
    if spec.max_epochs is None or spec.max_steps <= 0 or batches_per_epoch <= 0:
        return
    steps_per_epoch = math.ceil(batches_per_epoch / spec.accumulate_grad_batches)
    if spec.max_steps < spec.max_epochs * steps_per_epoch:
        warnings.warn(
            f"trainer.max_epochs={spec.max_epochs}: trainer.max_steps={spec.max_steps} stops training first, "
            f"after {spec.max_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps; "
            "set trainer.max_steps=-1 to train by epochs",
            UserWarning,
            stacklevel=2,
        )


def fit(
    model: PeftcModel,
    plan: Plan,
    output_dir: Path,
    loaders: tuple[DataLoader, DataLoader | None],
    resume: Path | None = None,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Train the plan's adapter (from a checkpoint when `resume` is given); returns the final
    train and validation metrics (with the `tokenizer`, also those scored on generated text).
    Raises RunInterrupted after a SIGTERM checkpoint."""
    quiet_lightning()
    model.train()
    task = tasks.get(plan.task)
    module = PeftcLightningModule(model, task, plan, tokenizer)
    if plan.spec.trainer.compile:
        # An earlier run in this process (a sweep's job) compiled the same decoder-layer code;
        # its compilations count against Dynamo's recompile limit, past which blocks run eagerly.
        torch._dynamo.reset()
        compile_blocks(model)
    train_loader, val_loader = loaders
    checkpointing = StepCheckpoint(
        output_dir,
        plan.spec.trainer.checkpoint_every_n_steps,
        train_loader if isinstance(train_loader, ResumableLoader) else None,
    )
    best = BestAdapter(model, plan.adapter_name, task.primary_metric) if val_loader is not None else None
    callbacks = [*methods.get(plan.method).callbacks(model, plan)]
    callbacks += validation_callbacks(plan.spec.trainer, task.primary_metric, best)
    callbacks.append(checkpointing)  # last: its save after a validation check holds what the others changed
    resumed_at = int(read_checkpoint(resume).get("global_step", 0)) if resume is not None else None
    warn_if_steps_stop_before_epochs(plan.spec.trainer, len(train_loader))
    trainer = build_trainer(plan, output_dir, callbacks, resumed_at)
    with ranks_rerun_this_job(output_dir), without_kv_cache(model), trackers_closed(trainer):
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
        if checkpointing.interrupted_at is not None:
            signal_name = checkpointing.stop_signal.name if checkpointing.stop_signal else "SIGTERM"
            raise RunInterrupted(checkpointing.path, checkpointing.interrupted_at, output_dir, signal_name)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if best is not None and plan.spec.trainer.save_best and best.restore():
            metrics.update({f"best_{task.primary_metric}": best.value, "best_step": float(best.step)})
            if trainer.is_global_zero:
                print(f"best {task.primary_metric}={best.value:.4g} at step {best.step}: its adapter is the one saved")
        if val_loader is not None:
            # One last pass: compiled blocks reuse what training compiled and compile nothing new
            # (AdaLoRA's cut gave each block its own ranks: a variant per distinct block).
            compiled = plan.spec.trainer.compile
            with torch.compiler.set_stance("eager_on_recompile") if compiled else nullcontext():
                for result in trainer.validate(module, val_loader, verbose=False):
                    metrics.update({k: float(v) for k, v in result.items()})
    metrics["steps"] = float(trainer.global_step)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The next job of a multirun starts its own ranks; a live group would hang it.
        torch.distributed.destroy_process_group()
    model.eval()
    return metrics


def metric_mode(metric: str) -> str:
    """Whether a lower ('min': losses, perplexity) or higher ('max': accuracy, F1, recall) value is better."""
    return "min" if "loss" in metric or "perplexity" in metric else "max"


def validation_callbacks(spec: Any, metric: str, best: BestAdapter | None) -> list[Any]:
    """Early stopping on the task's primary metric, and the best adapter's keeper."""
    from lightning.pytorch.callbacks import EarlyStopping

    callbacks: list[Any] = []
    if spec.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(
                monitor=metric,
                mode=metric_mode(metric),
                patience=spec.early_stopping_patience,
                check_on_train_epoch_end=False,  # after each validation check, not per epoch
                verbose=False,
            )
        )
    if spec.save_best and best is not None:
        callbacks.append(best)
    return callbacks


class BestAdapter(L.Callback):
    """Keeps a copy of the adapter's tensors at its best validation check (trainer.save_best)."""

    def __init__(self, model: PeftcModel, name: str, metric: str) -> None:
        self.model, self.name, self.metric, self.mode = model, name, metric, metric_mode(metric)
        self.value: float | None = None
        self.step = 0
        self.tensors: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        better = self.value is None or (value < self.value if self.mode == "min" else value > self.value)
        if better:
            self.value, self.step = value, trainer.global_step
            self.tensors = {k: t.detach().clone() for k, t in self.model.adapter_state_dict(self.name).items()}

    def state_dict(self) -> dict[str, Any]:
        """In each checkpoint (adapter-sized): a resumed run keeps the best check of the steps
        before it, and saves the adapter an uninterrupted run would have saved."""
        return {"value": self.value, "step": self.step, "tensors": self.tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step, self.tensors = state["value"], int(state["step"]), dict(state["tensors"])

    @torch.no_grad()
    def restore(self) -> bool:
        """Put the best tensors back into the adapter; False when no validation check ran."""
        if not self.tensors:
            return False
        for key, tensor in self.model.adapter_state_dict(self.name).items():
            tensor.copy_(self.tensors[key])
        return True


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile each block of the model's largest nn.ModuleList (the decoder layers) in
    place; returns how many. Per block rather than whole-model, as torchtune does: the blocks
    are identical (one compilation serves all), and the code around them (embeddings, the
    chunked loss with its hooks, prompt encoders) stays eager. Names and state dicts do not
    change (nn.Module.compile compiles the call, not a wrapper module). `backend` is
    torch.compile's (the benchmark's CPU smoke run uses "aot_eager": no code generation).
    A peftc model's generate() then runs its blocks eagerly (PeftcModel.blocks_compiled_for_training)."""
    from peftc.runtime.model import PeftcModel

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return 0
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in blocks:
        block.compile(backend=backend)
    if isinstance(model, PeftcModel):
        model.blocks_compiled_for_training = True
    return len(blocks)


@contextmanager
def without_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """Run with `use_cache=False` in every transformers config of the model (then restore them).
    Training has no use for a KV cache, and a cache object reaching a compiled block changes
    its guards every step (Dynamo recompiled each step on 'layers[i].keys' strides)."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    saved = {key: config.use_cache for key, config in configs.items()}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = saved[key]


@contextmanager
def ranks_rerun_this_job(output_dir: Path) -> Iterator[None]:
    """Lightning's DDP launcher starts ranks > 0 by re-running `sys.argv` with
    hydra.run.dir set from the Hydra config. In a multirun that command line is the whole sweep
    and run.dir is not this job's directory, so for the duration of fit the command line is
    this job's own overrides (plus no log files: only rank 0 writes) and run.dir its output dir."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    if not HydraConfig.initialized():
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_dir = sys.argv[:], hydra_cfg.run.dir
    sys.argv = [
        sys.argv[0],
        *hydra_cfg.overrides.task,
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = str(output_dir)
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_dir
