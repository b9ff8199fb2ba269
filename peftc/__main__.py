"""`python -m peftc [overrides]` (and the `peftc` console script).

Before Hydra runs, every job's overrides are composed and checked, so a typo, a wrong type or
an out-of-range value is one clean message on stderr and exit status 2, with no traceback
(set HYDRA_FULL_ERROR=1 for one) and nothing written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from peftc.compose import CONFIG_NAME, VERSION_BASE, compose, import_registries
from peftc.errors import PeftcError
from peftc.spec import to_spec

# Hydra flags that take a value, and flags that stop before any job runs.
_VALUE_FLAGS = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--package",
    "-p",
    "--experimental-rerun",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--cfg",
    "-c",
}
_INSPECT_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}


def main() -> None:
    import_registries()
    argv = sys.argv[1:]
    if not any(a.split("=")[0] in _INSPECT_FLAGS for a in argv):
        try:
            preflight(argv)
        except PeftcError as exc:
            fail(exc)
    hydra_main()


def preflight(argv: list[str]) -> None:
    """Compose and validate every job of this invocation before anything runs."""
    overrides, multirun = split_argv(argv)
    for job in expand_jobs(overrides) if multirun else [overrides]:
        try:
            to_spec(compose(job))
        except PeftcError as exc:
            if multirun:
                exc.args = (f"sweep job ({' '.join(job) or 'defaults'}): {exc}",)
            raise


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """Job overrides (without Hydra's own flags and hydra.* settings) and whether -m was given."""
    overrides, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            skip = arg in _VALUE_FLAGS and "=" not in arg
        elif not arg.lstrip("+~").startswith(("hydra.", "hydra/", "hydra=")):
            overrides.append(arg)
    return overrides, multirun


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job a basic-sweeper multirun would launch."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from peftc.compose import compose_error

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise compose_error(exc) from exc
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def fail(exc: PeftcError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


@hydra.main(version_base=VERSION_BASE, config_path="conf", config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peftc.run import execute

    hydra_cfg = HydraConfig.get()
    try:
        run = to_spec(cfg)
        output_dir = Path(run.output_dir) if run.output_dir else Path(hydra_cfg.runtime.output_dir)
        return execute(run, output_dir)
    except PeftcError as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(f"error: {exc}", file=sys.stderr)
            return {"status": "failed", "error": str(exc)}
        fail(exc)


if __name__ == "__main__":
    main()
