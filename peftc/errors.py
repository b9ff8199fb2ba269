"""One exception family, one subclass per stage, so the CLI can print any of them cleanly.

Every message names what was wrong (a config key or a file), the bad value, and what would work.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftcError(Exception):
    """Base of every error peftc raises on purpose; the CLI prints it and exits with status 2."""

    exit_code = 2


class ConfigError(PeftcError):
    """The composed configuration is malformed or asks for something impossible."""

    def __init__(self, key: str, value: object, problem: str, hint: str | None = None) -> None:
        self.key, self.value, self.problem, self.hint = key, value, problem, hint
        super().__init__(format_problem(key, value, problem, hint))

    def with_source(self, source: str) -> ConfigError:
        """The same error, naming the config file (or other source) that set its key."""
        if "[source: " in self.problem:
            return self
        return type(self)(self.key, self.value, f"{self.problem} [source: {source}]", self.hint)


class PlanError(ConfigError):
    """The spec is valid on its own but cannot be resolved against the model's module graph."""


class AdapterFileError(PeftcError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""

    def __init__(self, path: str, problem: str, hint: str | None = None) -> None:
        self.path, self.problem, self.hint = path, problem, hint
        message = f"{path}: {problem}"
        super().__init__(f"{message}; {hint}" if hint else message)


class MergeError(PeftcError, ValueError):
    """Adapters that cannot be folded into the base weights (a ValueError too, as in peft)."""


class DataError(PeftcError):
    """A dataset file or row cannot be used for the configured task."""

    def __init__(self, source: str, problem: str, hint: str | None = None) -> None:
        self.source, self.problem, self.hint = source, problem, hint
        message = f"{source}: {problem}"
        super().__init__(f"{message}; {hint}" if hint else message)


class TrainingDiverged(PeftcError):
    """The loss or the trained adapter is not finite: the run stops and saves nothing, so a
    previous adapter in the output directory is left as it was."""

    exit_code = 1  # the input was valid; the run failed

    def __init__(self, what: str, hint: str = "lower trainer.lr, or set trainer.gradient_clip_val") -> None:
        super().__init__(f"training diverged: {what}; nothing was saved; {hint}")


class RunInterrupted(PeftcError):
    """Training stopped on SIGTERM or Ctrl-C after writing a checkpoint at a step boundary."""

    def __init__(self, checkpoint: object, step: int, output_dir: object, signal_name: str = "SIGTERM") -> None:
        self.checkpoint, self.step = checkpoint, step
        # what a shell reports for a job ended by the signal: 128 + its number
        self.exit_code = 130 if signal_name == "SIGINT" else 143
        stopped_by = "Ctrl-C" if signal_name == "SIGINT" else signal_name
        super().__init__(
            f"training stopped by {stopped_by} after step {step}; checkpoint saved to {checkpoint}; "
            f"resume with resume={output_dir}"
        )


def first_line(exc: BaseException) -> str:
    """A library's exception as one line for a user: its message's first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def format_problem(key: str, value: object, problem: str, hint: str | None) -> str:
    shown = f"{key}={value!r}: " if value is not None else f"{key}: "
    return shown + problem + (f"; {hint}" if hint else "")


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str | None:
    """A 'did you mean ...?' phrase for the closest candidates, or None when nothing is close."""
    word = str(word)
    # Case-blind: `peft=LoRA` means lora.
    scored = sorted(
        ((difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio(), c) for c in set(candidates)),
        key=lambda sc: (-sc[0], sc[1]),
    )
    scored = [(score, c) for score, c in scored if score >= 0.6]
    if not scored:
        return None
    # Only the clearly best names: 'q_prj' suggests q_proj, not also v_proj and o_proj.
    matches = [c for score, c in scored[:n] if score >= scored[0][0] - 0.1]
    return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
