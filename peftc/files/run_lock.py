"""One run per output directory: a second run into a directory another run is writing is refused
(naming the holder), so plan.json, the adapter and the metrics there always come from one run.

An advisory `flock` on the directory itself: the kernel releases it when the holder exits, however
it exits, so a killed run never leaves a stale lock behind. While it holds the lock a run names
itself in `.peftc.lock` (removed when it finishes) so that a refused run can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftc.errors import PeftcError

LOCK_FILE = ".peftc.lock"


class OutputDirBusy(PeftcError):
    """Another run holds the output directory."""


@contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold the output directory's lock for the duration of the block, or refuse."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirBusy(
                f"output_dir={output_dir}: another run is writing there ({_holder(output_dir / LOCK_FILE)}); "
                "wait for it to finish or give this run another output_dir"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (output_dir / LOCK_FILE).write_text(json.dumps(holder))
        try:
            yield
        finally:
            (output_dir / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
