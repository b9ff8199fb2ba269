"""`resume=RUN`: continue a run as it was configured, in its own directory.

The run's command-line overrides come back (from its checkpoint, which records them, or from
Hydra's `.hydra/overrides.yaml` beside it for checkpoints written before they did) and go before
the ones given now, which win: `resume=RUN trainer.max_steps=400` trains the same run longer.
`output_dir` is the run's directory unless given. Whatever else differs from the checkpoint's
plan is refused when the job starts (peftc.files.checkpoints.check_resumable).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftc.config.spec import path_problem
from peftc.errors import ConfigError

_NOT_REPLAYED = ("resume=", "output_dir=", "hydra.", "hydra/")


def resume_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a `resume=` job: the run's own first, then these."""
    value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("resume=")), None)
    if value in (None, "null") or path_problem(value.strip("'\"")):
        return list(overrides)  # the spec's check refuses an unusable path, naming the key
    from peftc.cli.actions import hydra_value
    from peftc.files.checkpoints import find_checkpoint
    from peftc.files.run_dir import CHECKPOINT_DIR

    try:
        checkpoint = find_checkpoint(value.strip("'\""))
    except ConfigError:
        return list(overrides)  # the job's own checks name the problem, in their order
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent
    saved = saved_overrides(checkpoint, run_dir)
    if saved is None:
        return list(overrides)
    replayed = [o for o in saved if not o.lstrip("+~").startswith(_NOT_REPLAYED)]
    here = (
        []
        if any(o.lstrip("+").startswith("output_dir=") for o in overrides)
        else [f"output_dir={hydra_value(str(run_dir))}"]
    )
    print(f"resuming {checkpoint} with the run's overrides: {' '.join(replayed) or '(none)'}")
    return [*replayed, *here, *overrides]


def saved_overrides(checkpoint: Path, run_dir: Path) -> list[str] | None:
    """The command-line overrides the run was started with, where they were recorded."""
    from peftc.files.checkpoints import read_checkpoint

    try:
        recorded = read_checkpoint(checkpoint).get("peftc_overrides")
    except (ConfigError, AttributeError):
        recorded = None
    if isinstance(recorded, list) and all(isinstance(o, str) for o in recorded):
        return recorded
    hydra_record = run_dir / ".hydra" / "overrides.yaml"
    if hydra_record.is_file():
        import yaml

        try:
            listed = yaml.safe_load(hydra_record.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
            return None
        if isinstance(listed, list) and all(isinstance(o, str) for o in listed):
            return listed
    return None
