"""peftc: parameter-efficient fine-tuning as a declarative config compiler.

plan = peftc.compile(["peft=lora", "peft.r=8", "model=tiny_llama"])  # no weights touched
print(plan); plan.trainable_params; plan.to_json()
model = peftc.materialize(plan)                 # or materialize(plan, base_model=my_model)
model.save_adapter("out/")                      # PEFT layout, loadable by the peft package
model = peftc.load_adapter(base_model, "out/")  # ours and peft-saved adapters alike
merged = model.merge_and_unload()
result = peftc.train(["peft.r=8"], output_dir="runs/r8")  # what `python -m peftc peft.r=8` does
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftc.errors import AdapterFileError, ConfigError, DataError, PeftcError, PlanError
from peftc.installed import InstallError, check_installed
from peftc.noise import silence_import_noise
from peftc.version import __version__

silence_import_noise()

if TYPE_CHECKING:
    import os

    from peftc.cli.run import TrainResult
    from peftc.planning.plan import Plan

__all__ = [
    "compile",
    "train",
    "materialize",
    "load_adapter",
    "PeftcError",
    "ConfigError",
    "PlanError",
    "AdapterFileError",
    "DataError",
    "InstallError",
    "__version__",
]


def compile(overrides: Sequence[str] = ()) -> Plan:  # noqa: A001 - the public name is part of the design
    """Hydra overrides -> validated Plan (builds the model graph on the meta device only)."""
    if isinstance(overrides, str):  # a str is a Sequence of one-letter overrides
        raise ConfigError(
            "overrides",
            overrides,
            "is one string; peftc.compile takes a list of overrides",
            f"peftc.compile({overrides.split()!r})",
        )
    check_installed()
    from peftc.config.compose import compose, to_spec
    from peftc.files.load import plan_run

    return plan_run(to_spec(compose(overrides)), overrides)


def train(overrides: Sequence[str] = (), output_dir: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train as `python -m peftc OVERRIDES` does (the same checks, files and printed lines) from
    Python: no sys.argv, no Hydra app. Writes to `output_dir`, else the config's output_dir,
    else outputs/<date>/<time> under the working directory, as the CLI's default."""
    import datetime
    from pathlib import Path

    from peftc.cli.main import check_no_earlier_run, check_output_dir
    from peftc.cli.run import TrainResult, execute
    from peftc.planning.compat import check_spec

    plan = compile(overrides)
    run = plan.spec
    if run.action != "train" or run.dry_run:
        key, value = ("action", run.action) if run.action != "train" else ("dry_run", True)
        raise ConfigError(
            key, value, "peftc.train trains", "peftc.compile(overrides) gives the plan alone; the CLI runs eval/predict"
        )
    check_spec(run)
    now = datetime.datetime.now()
    target = Path(output_dir or run.output_dir or Path("outputs") / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}").expanduser()
    check_output_dir(str(target))
    check_no_earlier_run(str(target), run)
    summary = execute(run, target)
    metrics = {k: v for k, v in summary.items() if isinstance(v, float) and k != "wall_time_s"}
    return TrainResult(output_dir=target, adapter_dir=target / "adapter", plan=plan, metrics=metrics)


def __getattr__(name: str) -> Any:
    # materialize/load_adapter pull in torch-heavy code; keep `import peftc` light.
    if name in ("materialize", "load_adapter"):
        check_installed()
    if name == "materialize":
        from peftc.runtime.materialize import materialize

        return materialize
    if name == "load_adapter":
        from peftc.files.load import load_adapter

        return load_adapter
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")
