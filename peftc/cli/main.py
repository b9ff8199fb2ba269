"""`python -m peftc [overrides]` (and the `peftc` console script).

Before Hydra runs, every job's overrides are composed and checked, so a typo, a wrong type or
an out-of-range value is one clean message on stderr and exit status 2, with no traceback
(set HYDRA_FULL_ERROR=1 for one) and nothing written. The check covers what Hydra itself will
act on (`hydra.*`: callbacks, launchers, logging), what this machine can run (accelerator,
devices, precision), and refuses Hydra's pickle-based rerun before Hydra reads the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig

from peftc.config.compose import (
    CONFIG_MODULE,
    CONFIG_NAME,
    VERSION_BASE,
    check_search_path,
    hydra_runtime,
    to_spec,
)
from peftc.config.registry import import_registries
from peftc.config.spec import RunSpec, unusable_path
from peftc.errors import ConfigError, PeftcError
from peftc.installed import check_installed

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

# Inspect flags that compose (and with --resolve or a help template, resolve) the config: still no code, no environment.
_SHOW_CONFIG_FLAGS = {"--cfg", "-c", "--info", "-i", "--hydra-help"}
# 128 + SIGPIPE: the status a shell reports for a writer whose reader went away (`yes | head`).
_BROKEN_PIPE_STATUS = 141


def main() -> None:
    with plain_own_warnings(), stdout_whose_reader_may_leave():
        run_command_line()


def run_command_line() -> None:
    try:
        check_installed()  # before the registries import transformers, which imports torchao
    except PeftcError as exc:
        fail(exc)
    import_registries()
    argv = sys.argv[1:]
    if answered_here(argv):
        return
    try:
        refuse_pickle_flags(argv)
        refuse_dashed_overrides(argv)
        refuse_missing_config_dirs(argv)
        argv = config_paths_as_config_dirs(argv)
        check_search_path(*search_options(argv))  # before anything (Hydra's help included) composes
        argv = with_adapter_task(with_resumed_run(argv))
    except PeftcError as exc:
        fail(exc)
    sys.argv[1:] = argv
    try:
        if not any(a.split("=")[0] in _INSPECT_FLAGS for a in argv):
            preflight(argv)
        elif any(a.split("=")[0] in _SHOW_CONFIG_FLAGS for a in argv):
            check_safety(argv)
    except PeftcError as exc:
        fail(exc)
    hydra_main()
    report_failed_jobs()


_PACKAGE_DIR = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def plain_own_warnings() -> Iterator[None]:
    """peftc's own warnings reach a command-line user as one `warning: ...` line, like its
    errors, and once: the file, line and source text of the code that raised one are ours, not
    theirs, and the checks before Hydra and the job itself read the same data. Other
    libraries' warnings keep Python's format (they name the library that raised them)."""
    if getattr(warnings.showwarning, "plain_own_warnings", False):
        yield  # a job run by main() in this process
        return
    show_elsewhere = warnings.showwarning
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if not Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
            show_elsewhere(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"warning: {message}", file=file or sys.stderr)

    show.plain_own_warnings = True  # type: ignore[attr-defined]
    # Only the display is swapped: catch_warnings() would also reset the filters' registry.
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = show_elsewhere


class _ReaderLeft:
    """sys.stdout, except that a write to a pipe whose reader has gone (`python -m peftc --help |
    head`) ends the command quietly, as other command-line tools end, instead of with a traceback
    (Hydra's --cfg and --hydra-help report any exception as one, so it is caught at the write)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_left()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_left()

    def _reader_left(self) -> NoReturn:
        with contextlib.suppress(OSError, ValueError):  # Python flushes stdout again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        raise SystemExit(_BROKEN_PIPE_STATUS)  # not an Exception: nothing on the way reports it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_whose_reader_may_leave() -> Iterator[None]:
    stream = sys.stdout
    sys.stdout = _ReaderLeft(stream)
    try:
        yield
    finally:
        sys.stdout = stream


def refuse_pickle_flags(argv: list[str]) -> None:
    """Hydra's --experimental-rerun unpickles a file (running whatever it holds) before any check."""
    for index, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag == "--experimental-rerun":
            value = inline or (argv[index + 1] if index + 1 < len(argv) else None)
            raise ConfigError(
                "--experimental-rerun",
                value,
                "loads a pickle file, which runs whatever code it holds; peftc never loads pickles",
                "rerun with the overrides a run saved in its .hydra/overrides.yaml (plain YAML)",
            )


def refuse_dashed_overrides(argv: list[str]) -> None:
    """`--peft=lora` or `--trainer.lr 1e-4`, the flag style of other tools, would be Hydra's
    usage screen; a flag named like a config key says how to write it."""
    from peftc.config.spec import GROUPS

    keys = set(GROUPS) | {f.name for f in dataclasses.fields(RunSpec)}
    for index, arg in enumerate(argv):
        flag, given, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or flag.split(".")[0] not in keys:
            continue
        following = argv[index + 1] if index + 1 < len(argv) else ""
        value = value if given else following if following and not following.startswith("-") else "<value>"
        raise ConfigError(
            "argument", arg, "is a flag; peftc takes Hydra overrides, without dashes", f"write {flag}={value}"
        )


def config_paths_as_config_dirs(argv: list[str]) -> list[str]:
    """`--config-path D` (`-cp D`) is `--config-dir D`: Hydra would replace peftc's own config
    directory with D (read relative to peftc's source, not the working directory), so that
    peftc's groups and schemas, and the `config` a user's YAML extends, could not be found. The
    checks before Hydra already read it as a directory added to the search path."""
    rewritten = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        rewritten.append(f"--config-dir{equals}{value}" if flag in ("--config-path", "-cp") else arg)
    return rewritten


def refuse_missing_config_dirs(argv: list[str]) -> None:
    """`--config-dir D` where D is not a directory: Hydra's answer would be exit status 1 and
    its own warnings."""
    for index, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        value = inline or (argv[index + 1] if index + 1 < len(argv) else "")
        if (
            flag in ("--config-dir", "-cd", "--config-path", "-cp")
            and value
            and "://" not in value
            and not os.path.isdir(value)
        ):
            problem = "is not a directory" if os.path.lexists(value) else "no such directory"
            raise ConfigError(flag, value, problem, "give the directory that holds your config YAML files")


def check_safety(argv: list[str]) -> None:
    """The config safety check alone (for --cfg/--info, which print the config but run no job)."""
    from peftc.config.provenance import check_sources

    overrides, _ = split_argv(argv)
    search, config_name = search_options(argv)
    check_sources([*search, *hydra_settings(argv), *overrides], config_name)


def too_deep(argv: list[str]) -> ConfigError:
    """The override nested past what the config parsers can follow, named."""
    deepest = max(argv, key=lambda a: a.count("[") + a.count("{"), default="")
    key = deepest.split("=", 1)[0]
    return ConfigError(
        key, None, "is nested too deeply to parse", "flatten the value (lists and mappings a few levels deep)"
    )


def answered_here(argv: list[str]) -> bool:
    """`--version` and `--help [group=option ...]` are peftc's own pages (Hydra's help is at
    --hydra-help); True when one was printed."""
    from peftc.cli.help import help_text, version_text

    if "--version" in argv:
        print(version_text())
        return True
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text([a for a in argv if not a.startswith("-")]))
        except PeftcError as exc:
            fail(exc)
        return True
    return False


def with_resumed_run(argv: list[str]) -> list[str]:
    """With `resume=RUN`, the run's own overrides come back before the ones given (peftc.cli.resume)."""
    if not any(a.lstrip("+").startswith("resume=") for a in argv):
        return argv
    from peftc.cli.resume import resume_overrides

    overrides, _ = split_argv(argv)
    flags = [a for a in argv if a not in overrides]
    return flags + resume_overrides(overrides)


def with_adapter_task(argv: list[str]) -> list[str]:
    """With `adapter=DIR`, the task (and its saved settings) follow the adapter unless task= is given."""
    if not any(a.startswith("adapter=") for a in argv):
        return argv
    from peftc.cli.actions import adapter_overrides

    overrides, _ = split_argv(argv)
    flags = [a for a in argv if a not in overrides]
    return flags + adapter_overrides(overrides)


def preflight(argv: list[str]) -> None:
    """`check_jobs`, with a value nested past what the parsers follow refused by name (Hydra's
    and OmegaConf's parsers recurse once per nesting level)."""
    try:
        check_jobs(argv)
    except RecursionError:
        raise too_deep(argv) from None


def check_jobs(argv: list[str]) -> None:
    """Compose and validate every job of this invocation before anything runs (with the user's
    config directories and primary config name, as Hydra will).

    `explain=true` prints where each value came from and `-m ... dry_run=true` previews the
    whole sweep; both exit here, before Hydra launches anything.
    """
    overrides, multirun = split_argv(argv)
    search, config_name = search_options(argv)
    settings = hydra_settings(argv)
    each = expand_jobs(overrides) if multirun else [overrides]
    jobs = [check_job(job, search, config_name, settings, i if multirun else None) for i, job in enumerate(each)]
    valid = [job.spec for job in jobs if job.spec is not None]
    if any(spec.explain for spec in valid):
        from peftc.cli.explain import print_explanations

        print_explanations([job.overrides for job in jobs], search, config_name)
        sys.exit(0)
    if multirun and (any(spec.dry_run for spec in valid) or _asks_dry_run(overrides)):
        from peftc.cli.preview import preview

        sys.exit(preview(jobs))
    for job in jobs:
        if job.error is not None:
            if multirun:
                job.error.args = (f"sweep job ({' '.join(job.overrides) or 'defaults'}): {job.error}",)
            raise job.error
    if not multirun and valid and valid[0].action == "predict":
        from peftc import tasks
        from peftc.cli.actions import input_rows

        input_rows(valid[0], tasks.for_spec(valid[0].task))  # a bad input file, before Hydra's run directory
    if not multirun and valid and valid[0].action == "train":
        # A plan error, found before Hydra creates a run directory, leaves nothing behind. (In a
        # sweep it stays the job's row of the summary, and the sweep goes on.)
        from peftc.files.load import plan_run

        plan_run(valid[0], overrides)
        if valid[0].output_dir and not valid[0].dry_run:
            check_output_dir(valid[0].output_dir)


def check_output_dir(output_dir: str, key: str = "output_dir") -> None:
    """An output directory the run could not write (`key` names where it was set), refused
    before anything loads."""
    path = Path(output_dir).expanduser()
    problem = unusable_path(str(path))
    if problem is not None:
        raise ConfigError(key, output_dir, problem, "use a shorter directory name")
    if path.exists() and not path.is_dir():
        raise ConfigError(key, output_dir, "is a file, not a directory", "give a directory path")
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.exists():  # a symbolic link to nothing: no directory can be made through it
        raise ConfigError(
            key, output_dir, f"{existing} is a symbolic link to {os.readlink(existing)}, which does not exist",
            f"create the link's target directory, or give another {key}",
        )  # fmt: skip
    if not existing.is_dir() or not _can_create_in(existing):
        raise ConfigError(
            key, output_dir, f"cannot be written ({existing} is not writable)", "choose a writable directory"
        )


def check_no_earlier_run(output_dir: str, run: RunSpec, key: str = "output_dir") -> None:
    """A training run's adapter and checkpoints are written over nothing: a directory that holds an
    earlier run's (its adapter/, or the checkpoints/ an interrupted run left) is refused, as
    transformers' example scripts refuse a non-empty output_dir, unless resume= continues it.
    `key` names where the directory was set."""
    from peftc.files.run_dir import ADAPTER_DIR, CHECKPOINT_DIR

    path = Path(output_dir).expanduser()
    found = next((name for name in (ADAPTER_DIR, CHECKPOINT_DIR) if (path / name).exists()), None)
    if found is None or run.resume is not None:
        return
    raise ConfigError(
        key,
        output_dir,
        f"already holds an earlier run ({found}/), which this run would replace",
        f"give a new {key}, resume={output_dir} to continue that run, or remove it first",
    )


def check_job_dir(spec: RunSpec, cfg: DictConfig, job_num: int | None) -> None:
    """A training job's directory, single or in a sweep: its output_dir, else the run directory
    Hydra will make for it (a hydra.run.dir or hydra.sweep.dir an earlier run used), holds no
    earlier run."""
    from omegaconf import OmegaConf

    if spec.action != "train" or spec.dry_run:
        return
    if spec.output_dir:
        check_no_earlier_run(spec.output_dir, spec)
        return
    run_dir = OmegaConf.select(cfg, "hydra.runtime.output_dir", throw_on_missing=False) if "hydra" in cfg else None
    if run_dir:
        check_no_earlier_run(str(run_dir), spec, key="hydra.run.dir" if job_num is None else "hydra.sweep.dir")


def check_run_dir(cfg: DictConfig, *, sweep: bool = False) -> None:
    """Hydra creates its run directory (hydra.run.dir), or a sweep's (hydra.sweep.dir), before
    any job starts, whatever output_dir says: one it could not make is refused as an output_dir is."""
    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    where = key if sweep else "hydra.runtime.output_dir"
    run_dir = OmegaConf.select(cfg, where, throw_on_missing=False) if "hydra" in cfg else None
    if run_dir:
        check_output_dir(str(run_dir), key=key)


def _can_create_in(directory: Path) -> bool:
    """Whether a directory can be made there, found by making (and removing) one: permission
    bits do not tell for root, a read-only mount or a pseudo filesystem such as /proc."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".peftc-probe-", dir=directory))
    except OSError:
        return False
    return True


@dataclass
class CheckedJob:
    overrides: list[str]
    spec: RunSpec | None
    error: PeftcError | None


def check_job(
    overrides: list[str],
    search: Sequence[str] = (),
    config_name: str = CONFIG_NAME,
    settings: Sequence[str] = (),
    job_num: int | None = None,
) -> CheckedJob:
    """Compose and validate one job (number `job_num` of a sweep). The whole config Hydra will
    run, `hydra.*` (with the command line's hydra `settings`) included, is checked for code and
    environment reads first; then the spec, with `${hydra:...}` resolved as in the job, and the
    compatibility rules that need no model (strategies, this machine)."""
    from peftc.config.provenance import check_sources
    from peftc.planning.compat import check_spec

    try:
        # The checked composition is the job's config: composing it again would double the
        # preflight's cost (Hydra's composition is most of a failing command's time).
        composition = check_sources([*search, *settings, *overrides], config_name)
        try:
            with hydra_runtime(composition.config, job_num) as cfg:
                spec = to_spec(cfg)
            check_run_dir(composition.config, sweep=job_num is not None)
            check_job_dir(spec, composition.config, job_num)
            check_spec(spec)  # what this machine cannot run, before Hydra creates a run directory
        except ConfigError as exc:
            raise composition.naming_user_file(exc) from exc
        return CheckedJob(overrides, spec, None)
    except PeftcError as exc:
        return CheckedJob(overrides, None, exc)


def _asks_dry_run(overrides: list[str]) -> bool:
    return any(o.lstrip("+").lower() in ("dry_run=true", "dry_run=1") for o in overrides)


def report_failed_jobs() -> None:
    """After a multirun whose summary recorded failed jobs: say so and exit with status 1."""
    from peftc.cli import sweep

    if sweep.last_failures:
        jobs = ", ".join(str(r.get("job")) for r in sweep.last_failures)
        print(f"error: {len(sweep.last_failures)} sweep job(s) failed ({jobs}); see sweep_summary.csv", file=sys.stderr)
        sys.exit(1)


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


def hydra_settings(argv: list[str]) -> list[str]:
    """The command line's hydra.* overrides and hydra/ group choices (search paths aside: see
    search_options), which split_argv leaves out of the job overrides."""
    settings, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in _VALUE_FLAGS and "=" not in arg
        elif arg.lstrip("+~").startswith(("hydra.", "hydra/", "hydra=")) and "hydra.searchpath=" not in arg:
            settings.append(arg)
    return settings


def search_options(argv: list[str]) -> tuple[list[str], str]:
    """Hydra's search-path settings of this command line as compose overrides, and the primary
    config name: `--config-dir D` (and `--config-path D`) add D to the search path, as does
    `hydra.searchpath=[...]`; `--config-name N` picks the primary config."""
    dirs: list[str] = []
    searchpath: list[str] = []
    config_name = CONFIG_NAME
    for index, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        value = inline if inline else (argv[index + 1] if index + 1 < len(argv) else "")
        if flag in ("--config-dir", "-cd", "--config-path", "-cp") and value:
            dirs.append(value if "://" in value else f"file://{os.path.abspath(value)}")
        elif flag in ("--config-name", "-cn") and value:
            config_name = value
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            searchpath.append(arg.lstrip("+"))
    if dirs:
        return [f"hydra.searchpath=[{','.join(dirs)}]", *searchpath], config_name
    return searchpath, config_name


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job a basic-sweeper multirun would launch."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from peftc.config.compose import compose_error

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


@hydra.main(version_base=VERSION_BASE, config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    # Again here: a launcher may run this job in a worker process that never ran main().
    with plain_own_warnings():
        return run_job(cfg, HydraConfig.get())


def run_job(cfg: DictConfig, hydra_cfg: Any) -> Any:
    from hydra.types import RunMode

    from peftc.cli.run import execute
    from peftc.config.compose import RUN_OVERRIDES

    run_dir = Path(hydra_cfg.runtime.output_dir)
    single = hydra_cfg.mode != RunMode.MULTIRUN
    recorded = RUN_OVERRIDES.set(tuple(hydra_cfg.overrides.task))  # checkpoints record them for resume=
    try:
        run = to_spec(cfg)
        output_dir = Path(run.output_dir).expanduser() if run.output_dir else run_dir  # '~/runs' as the check read it
        # The checks read relative paths from where peftc was started; hydra.job.chdir=true must not move them.
        with contextlib.chdir(hydra_cfg.runtime.cwd):
            summary = execute(run, output_dir)
        if single and run.dry_run:
            discard_unused_run_dir(run_dir)  # a dry run writes nothing
        elif single:
            keep_record_in_output_dir(run_dir, Path(hydra_cfg.runtime.cwd) / output_dir)
        return summary
    except PeftcError as exc:
        if not single:
            print(f"error: {exc}", file=sys.stderr)
            return {"status": "failed", "error": str(exc)}
        discard_unused_run_dir(run_dir)  # a run that failed before writing leaves nothing
        fail(exc)
    except Exception as exc:
        if not single:
            # One broken job is a row of the sweep summary, not the end of the sweep.
            return failed_job(exc, run_dir)
        raise
    finally:
        RUN_OVERRIDES.reset(recorded)


def keep_record_in_output_dir(run_dir: Path, output_dir: Path) -> None:
    """A run given `output_dir=` (elsewhere than Hydra's run directory) keeps Hydra's record of its
    config (`.hydra/`, and `peftc.log` if anything was logged) in output_dir, beside what it
    wrote, replacing an earlier run's; the run directory Hydra made under outputs/ then goes."""
    import shutil

    from peftc.cli.run import is_global_zero

    run_dir, output_dir = run_dir.resolve(), output_dir.resolve()
    if not is_global_zero() or not output_dir.is_dir() or output_dir == run_dir or run_dir in output_dir.parents:
        return
    for name in (".hydra", "peftc.log"):
        record, kept = run_dir / name, output_dir / name
        if not record.exists() or (name == "peftc.log" and record.stat().st_size == 0):
            continue
        if kept.is_dir():
            shutil.rmtree(kept)
        shutil.move(record, kept)
    discard_unused_run_dir(run_dir)


def discard_unused_run_dir(run_dir: Path) -> None:
    """Remove the run directory Hydra made for this job when the job wrote nothing into it:
    only Hydra's `.hydra/` record and an empty (or absent) log are there. Empty parents
    (`outputs/<date>/`) go too."""
    import shutil

    if not run_dir.is_dir():
        return
    entries = {p.name: p for p in run_dir.iterdir()}
    log = entries.pop("peftc.log", None)
    hydra_record = entries.pop(".hydra", None)
    if entries or (log is not None and log.stat().st_size > 0):
        return
    if hydra_record is not None:
        shutil.rmtree(hydra_record, ignore_errors=True)
    if log is not None:
        log.unlink(missing_ok=True)
    for directory in (run_dir, *run_dir.parents):
        if directory == Path.cwd() or any(directory.iterdir()):
            break
        directory.rmdir()


def failed_job(exc: Exception, job_dir: Path) -> dict[str, Any]:
    import traceback

    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))
    message = f"{type(exc).__name__}: {exc}"
    print(f"error: job failed: {message} (traceback in {job_dir / 'error.txt'})", file=sys.stderr)
    return {"status": "failed", "error": message}


if __name__ == "__main__":
    main()
