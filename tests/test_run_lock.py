"""One run per output directory: a second run into a directory another run is writing is refused
with who holds it, and a finished (or killed) run leaves no lock behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from peftc.files.run_lock import LOCK_FILE, run_lock
from tests.helpers import run_cli


def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    output = tmp_path / "run"
    with run_lock(output):
        result = run_cli(["trainer.max_steps=2", f"output_dir={output}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another run is writing there" in errors[0], result.stderr
    assert f"pid {os.getpid()}" in errors[0]
    assert not (output / "plan.json").exists() and not (output / "adapter").exists()


def test_the_lock_is_released_when_its_run_ends(tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = run_cli(["trainer.max_steps=2", f"output_dir={output}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert not (output / LOCK_FILE).exists()  # a finished run leaves nothing of the lock
    with run_lock(output):  # taken at once: the finished run holds nothing
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path; from peftc.files.run_lock import run_lock\n"
         f"with run_lock(Path({str(output)!r})):\n    print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (output / LOCK_FILE).exists()  # the holder's name stays; its lock went with it
    with run_lock(output):
        pass
