"""Faults lose nothing: killed or terminated training resumes to the bit-identical adapter,
checkpoints are small and refuse foreign plans, and failed writes (full disk, read-only
directory, a writer killed mid-save) leave the previous adapter loadable.

Deterministic CPU settings for the resume tests: one thread (OMP_NUM_THREADS=1),
trainer.deterministic=true, lora_dropout=0.1 (so the RNG state matters), 40 steps over ~2.7
epochs of 15 batches. Tolerance: none, every tensor must be bit-identical.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.files.checkpoints import AtomicCheckpointIO, StepCheckpoint
from tests.helpers import REPO, build_base

RESUMABLE = [
    "trainer.max_steps=40",
    "data.limit_examples=40",
    "peft.lora_dropout=0.1",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "predict_samples=0",
]


def cli_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def start_cli(args: list[str], run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "peftc", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: max {max_abs(a, b):.3g}"


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged_steps(run_dir: Path) -> list[int]:
    import csv

    with (run_dir / "logs" / "metrics.csv").open() as fh:
        return sorted({int(row["step"]) for row in csv.DictReader(fh) if row.get("train_loss")})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    code, stderr = finish(start_cli(RESUMABLE, run_dir))
    assert code == 0, stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run SIGKILLed right after its first checkpoint (step 5), mid-epoch."""
    run_dir = tmp_path_factory.mktemp("faults") / "killed"
    process = start_cli(RESUMABLE, run_dir)
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    code, _ = finish(process)
    assert code == -signal.SIGKILL, "the run must still have been training when killed"
    assert not (run_dir / "adapter").exists()
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_bit_identical_adapter(
    uninterrupted: Path, killed: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    half_written = killed / "checkpoints" / ".last.ckpt.tmp-999999-k1ll3d"  # a checkpoint save killed mid-write
    half_written.write_bytes(b"half a checkpoint")
    resumed = tmp_path / "resumed"
    code, stderr = finish(start_cli([*RESUMABLE, f"resume={killed}", f"output_dir={resumed}"], resumed))
    assert code == 0, stderr[-3000:]
    assert not half_written.exists(), "resuming cleans the dead writer's temp file"
    assert logged_steps(resumed)[0] >= checkpoint["global_step"], "the resumed run must start at the checkpoint"
    assert logged_steps(resumed)[-1] == logged_steps(uninterrupted)[-1]
    assert_bit_identical(adapter_tensors(uninterrupted), adapter_tensors(resumed))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_boundary_and_resumes_exactly(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "terminated"
    process = start_cli(RESUMABLE, run_dir)
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)
    assert code == 143, stderr[-3000:]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"stopped by SIGTERM after step {step}" in stderr and 5 <= step < 40
    assert not (run_dir / "adapter").exists(), "an interrupted run must not look finished"
    resumed = tmp_path / "resumed"
    code, stderr = finish(
        start_cli([*RESUMABLE, f"resume={run_dir / 'checkpoints' / 'last.ckpt'}", f"output_dir={resumed}"], resumed)
    )
    assert code == 0, stderr[-3000:]
    assert_bit_identical(adapter_tensors(uninterrupted), adapter_tensors(resumed))


@pytest.mark.slow
def test_resuming_into_another_plan_is_refused_before_anything_loads(
    killed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftc.cli.run import execute
    from peftc.config.compose import compose, to_spec

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be loaded before the fingerprint check")

    monkeypatch.setattr("peftc.runtime.materialize.load_base_model", never)
    monkeypatch.setattr("peftc.planning.model_source.load_tokenizer", never)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", never)
    run = to_spec(compose([*RESUMABLE, "trainer.lr=0.001", f"resume={killed}"]))
    with pytest.raises(peftc.ConfigError, match=r"different plan \(trainer.lr: 0.003 -> 0.001\)"):
        execute(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_checkpoints_hold_only_trainable_state_and_are_small(tmp_path: Path) -> None:
    from peftc.cli.run import execute
    from peftc.config.compose import compose, to_spec

    overrides = [
        "model=tiny_llama",
        "model.config.hidden_size=256",
        "model.config.intermediate_size=512",
        "model.config.num_hidden_layers=4",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "data.limit_examples=16",
        "predict_samples=0",
        "trainer.logger=none",
    ]
    run = to_spec(compose(overrides))
    execute(run, tmp_path)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # plain containers only: no unsafe unpickling
    plan = peftc.compile(overrides)
    model = peftc.materialize(plan, base_model=build_base(plan))
    trainable = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    [optimizer] = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(trainable)
    size = path.stat().st_size
    assert size <= 3 * plan.adapter_bytes + 64 * 1024, "weights + two AdamW moments + bookkeeping"
    assert size < 0.05 * plan.model.base_bytes, f"{size} bytes vs base {plan.model.base_bytes}"
    assert checkpoint["peftc_fingerprint"] == plan.fingerprint


def test_a_checkpoint_write_that_fails_halfway_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, path)
    before = path.read_bytes()

    def half_then_fail(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 10}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------- write faults
@pytest.fixture
def saved(tmp_path: Path) -> tuple[peftc.planning.plan.Plan, torch.nn.Module, Path]:
    plan = peftc.compile(["peft.init_lora_weights=false", "peft.r=2"])
    base = build_base(plan)
    out = tmp_path / "out"
    return plan, base, out


def mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]).returncode == 0


def mount_read_only(target: Path) -> bool:
    """Bind-mount a directory onto itself read-only (root ignores permission bits)."""
    if subprocess.run(["mount", "--bind", str(target), str(target)]).returncode != 0:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(target)]).returncode != 0:
        subprocess.run(["umount", str(target)])
        return False
    return True


def assert_previous_adapter_intact(base: torch.nn.Module, target: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = peftc.load_adapter(copy.deepcopy(base), target).adapter_state_dict("default")
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "no staging leftovers"


@pytest.mark.slow
def test_a_full_disk_surfaces_and_keeps_the_previous_adapter(saved, tmp_path: Path) -> None:
    """A real ENOSPC: a 192 KiB tmpfs holds a rank-2 adapter but not a rank-256 one."""
    plan, base, _ = saved
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "192k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the catalogue simulates ENOSPC")
    try:
        small = peftc.materialize(plan, base_model=copy.deepcopy(base))
        small.save_adapter(disk / "adapter")
        expected = {k: v.detach().clone() for k, v in small.adapter_state_dict("default").items()}
        big_plan = peftc.compile(["peft.target_modules=all-linear", "peft.r=256"])
        big = peftc.materialize(big_plan, base_model=copy.deepcopy(base))
        assert big_plan.adapter_bytes > 192 * 1024
        with pytest.raises(peftc.AdapterFileError, match="the disk is full"):
            big.save_adapter(disk / "adapter")
        assert_previous_adapter_intact(base, disk / "adapter", expected)
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_a_read_only_output_dir_surfaces_and_keeps_the_previous_adapter(saved, tmp_path: Path) -> None:
    plan, base, out = saved
    model = peftc.materialize(plan, base_model=copy.deepcopy(base))
    model.save_adapter(out / "adapter")
    expected = {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}
    if os.geteuid() == 0:
        if not mount_read_only(out):
            pytest.skip("running as root without mount rights: a read-only directory cannot be made")
    else:
        out.chmod(0o555)
    try:
        with pytest.raises(peftc.AdapterFileError, match="read-only|permission denied"):
            model.save_adapter(out / "adapter")
        assert_previous_adapter_intact(base, out / "adapter", expected)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(out)])
        else:
            out.chmod(0o755)


KILLED_WRITER = textwrap.dedent(
    """
    import copy, os, sys, time
    from pathlib import Path
    import peftc
    from peftc.files import atomic
    from tests.helpers import build_base

    target, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    plan = peftc.compile(["peft.init_lora_weights=false", "peft.r=4", "seed=1"])
    model = peftc.materialize(plan, base_model=build_base(plan))

    def stall():
        ready.write_text("now")
        time.sleep(600)

    if mode == "mid-write":  # killed while the new weights are half written in the staging dir
        import safetensors.torch
        real = safetensors.torch.save_file
        def half(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])
            stall()
        safetensors.torch.save_file = half
    else:  # no RENAME_EXCHANGE: killed after the old dir was moved aside, before the new one moved in
        atomic.exchange = lambda a, b: False
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                stall()
        atomic.os.rename = rename
    model.save_adapter(target)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-write", "between-renames"])
def test_a_writer_killed_mid_save_loses_nothing(saved, tmp_path: Path, mode: str) -> None:
    plan, base, out = saved
    model = peftc.materialize(plan, base_model=copy.deepcopy(base))
    model.save_adapter(out / "adapter")
    expected = {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out / "adapter"), str(ready), mode], cwd=REPO, env=cli_env()
    )
    wait_for(ready, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    left = sorted(p.name for p in out.iterdir())
    if mode == "mid-write":  # the target was never touched; the dead writer's staging dir remains
        assert left[0].startswith(".adapter.tmp-") and left[1] == "adapter", left
    else:  # the old copy is aside, the target path is empty
        assert [n.split("-")[0] for n in left] == [".adapter.old", ".adapter.tmp"], left
    # Loading puts a copy moved aside back; the next save removes whatever the dead writer left.
    loaded = peftc.load_adapter(copy.deepcopy(base), out / "adapter").adapter_state_dict("default")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    model.save_adapter(out / "adapter")
    assert_previous_adapter_intact(base, out / "adapter", expected)


def test_atomic_single_file_writes_respect_the_umask(tmp_path: Path) -> None:
    """Temp files start as 0600; the written plan/metrics/checkpoint must be ordinary files."""
    import os

    from peftc.files.atomic import write_file_atomic, write_text_atomic

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "plan.json", "{}\n")
        write_file_atomic(tmp_path / "sub" / "last.ckpt", lambda fh: fh.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "plan.json").read_text() == "{}\n"
    assert [(p.stat().st_mode & 0o777) for p in (tmp_path / "plan.json", tmp_path / "sub" / "last.ckpt")] == [0o644] * 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["last.ckpt", "plan.json", "sub"]


def test_a_second_ctrl_c_stops_at_once_while_a_first_waits_for_the_step(tmp_path: Path) -> None:
    callback = StepCheckpoint(tmp_path, every_n_steps=0, loader=None)
    callback._on_signal(signal.SIGINT, None)  # the first: recorded, acted on at the step boundary
    assert callback.stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._on_signal(signal.SIGINT, None)


@pytest.mark.parametrize(
    ("every_n_steps", "max_steps", "saved"),
    [
        (2, 5, [(2, 4), (4, 8), (5, 10)]),  # every 2 steps, and after the last
        (2, -1, [(2, 4), (4, 8)]),  # an epoch-bounded run (max_steps=-1) has no last step to save at
        (0, 5, []),  # 0: only on a stop signal
    ],
    ids=["every-2", "epoch-bounded", "off"],
)
def test_checkpoints_are_written_at_optimizer_step_boundaries_only(
    tmp_path: Path, every_n_steps: int, max_steps: int, saved: list[tuple[int, int]]
) -> None:
    """With 2 batches per optimizer step, a save mid-accumulation would hold half a step's
    gradients nowhere: each checkpoint is at a step boundary, with the batches done so far."""
    from types import SimpleNamespace

    from peftc.files.checkpoints import ResumableLoader

    loader = ResumableLoader(range(10))
    written: list[tuple[int, int]] = []
    trainer = SimpleNamespace(global_step=0, max_steps=max_steps, should_stop=False)
    trainer.save_checkpoint = lambda path, weights_only: written.append((trainer.global_step, loader.batches_done))
    callback = StepCheckpoint(tmp_path, every_n_steps, loader)
    callback.on_train_start(trainer, None)
    try:
        for batch_idx in range(10):
            trainer.global_step = (batch_idx + 1) // 2  # accumulate_grad_batches=2
            callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    finally:
        callback.on_train_end(trainer, None)
    assert written == saved and not trainer.should_stop


@pytest.mark.parametrize("end", ["on_train_end", "on_exception"])
def test_the_previous_signal_handlers_are_back_once_training_ends(tmp_path: Path, end: str) -> None:
    """After training (saving, predictions, the next cell of a notebook) Ctrl-C and SIGTERM act
    as before again, instead of being recorded for a step boundary that never comes."""
    from types import SimpleNamespace

    before = [signal.getsignal(s) for s in StepCheckpoint.SIGNALS]
    callback = StepCheckpoint(tmp_path, every_n_steps=0, loader=None)
    trainer = SimpleNamespace(global_step=0)
    callback.on_train_start(trainer, None)
    assert [signal.getsignal(s) for s in StepCheckpoint.SIGNALS] == [callback._on_signal] * 2
    if end == "on_train_end":
        callback.on_train_end(trainer, None)
    else:
        callback.on_exception(trainer, None, RuntimeError("failed mid-run"))
    assert [signal.getsignal(s) for s in StepCheckpoint.SIGNALS] == before


def test_a_resumed_loader_skips_the_checkpoints_batches_in_its_epoch_only() -> None:
    """The batches a checkpoint had consumed are skipped in the epoch it was written in, once; a
    resumed run that starts the next epoch (a checkpoint at an epoch's end) sees all of it."""
    from peftc.files.checkpoints import ResumableLoader, ResumableSampler

    def loader() -> ResumableLoader:
        return ResumableLoader(range(12), batch_size=2, sampler=ResumableSampler(12, seed=3))

    uninterrupted = loader()
    epochs = []
    for epoch in range(2):
        uninterrupted.sampler.set_epoch(epoch)
        epochs.append(list(uninterrupted.sampler))
    mid_epoch = loader()
    mid_epoch.load_state_dict({"epoch": 0, "batches_done": 2})
    assert list(mid_epoch.sampler) == epochs[0][4:]
    mid_epoch.sampler.set_epoch(1)
    assert list(mid_epoch.sampler) == epochs[1]
    next_epoch = loader()
    next_epoch.load_state_dict({"epoch": 0, "batches_done": 6})
    next_epoch.sampler.set_epoch(1)
    assert list(next_epoch.sampler) == epochs[1]
