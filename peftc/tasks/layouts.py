"""Dataset layouts people bring from other tools, recognised by their columns where reading them
as asked would go wrong: TRL's preference sets (`chosen`/`rejected` for DPO; a true/false `label`
beside each `completion` for KTO), which peftc does not train, and instruction sets whose second
column belongs in the prompt (Alpaca's `input`, Dolly's `context` beside the `instruction`), which
a prompt read from the instruction alone would silently drop. data.py asks these for the one-line
error, so that it says what the data is and what to type.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

PREFERENCE = ("chosen", "rejected")
# An instruction column, and the columns instruction sets put beside it that complete its prompt.
INSTRUCTION, INSTRUCTION_INPUTS = "instruction", ("input", "context")
# What the answer column of an instruction set is called (Alpaca, Dolly).
INSTRUCTION_ANSWERS = ("output", "response")


def watched(read: Collection[str]) -> list[str]:
    """Columns the checks below look at beside the columns `read` (for a source that reads only
    the columns it is asked for)."""
    extra = list(INSTRUCTION_INPUTS) if INSTRUCTION in read else []
    return extra + (["label"] if "completion" in read else [])


def preference(row: Mapping[str, Any], field: str) -> tuple[str, str | None] | None:
    """A row of a preference set, which lacks the column of `field`: what it is, and the mapping
    that fine-tunes on its preferred answers where one does (TRL's implicit-prompt rows, whose
    `chosen` holds the whole text or conversation, or a prompt with text answers)."""
    if not all(column in row for column in PREFERENCE):
        return None
    problem = (
        "has 'chosen' and 'rejected' columns: a preference dataset (TRL's DPO, ORPO, reward training), "
        "which peftc does not train"
    )
    if "prompt" not in row:
        mapping = f"+data.columns.{field}=chosen"
    elif not isinstance(row["prompt"], str):  # a conversation's prompt: no mapping joins it to its answer
        return problem, None
    elif field == "response":
        mapping = "+data.columns.response=chosen"
    else:
        mapping = "data.format=prompt_response +data.columns.response=chosen"
    return problem, f"to fine-tune on the preferred answers alone: {mapping}"


def unread(row: Mapping[str, Any], read: Collection[str], columns: Mapping[str, Any]) -> tuple[str, str] | None:
    """A column no field reads that changes what the row means: a KTO label on its completion, or
    the input of an instruction read without it. `read`: the columns the fields come from."""
    if "completion" in read and "label" not in read and isinstance(row.get("label"), bool):
        return (
            "has a true/false 'label' beside its 'completion': an unpaired preference dataset (TRL's KTO), "
            "which peftc does not train",
            "to fine-tune on the good completions, keep the rows labelled true and drop the label column",
        )
    if INSTRUCTION not in read:
        return None
    extra = next((c for c in INSTRUCTION_INPUTS if c not in read and str(row.get(c) or "").strip()), None)
    if extra is None:
        return None
    field, mapped = next(
        ((f, c) for f, c in columns.items() if INSTRUCTION in ([c] if isinstance(c, str) else c)), (None, None)
    )
    if field is None:
        return None
    together = ",".join([*([mapped] if isinstance(mapped, str) else mapped), extra])
    return (
        f"its {extra!r} holds text that no field reads (it completes the instruction's prompt)",
        f"read both: data.columns.{field}=[{together}] (their texts joined by a blank line)",
    )


def hint(row: Mapping[str, Any], field: str) -> str | None:
    """What to type for an instruction set whose prompt or response field has no column of its name."""
    if field not in ("prompt", "response") or INSTRUCTION not in row:
        return None
    prompt = ",".join([INSTRUCTION, *(c for c in INSTRUCTION_INPUTS if c in row)])
    answer = next((c for c in INSTRUCTION_ANSWERS if c in row), None)
    if answer == "response":
        return f"instruction rows: +data.columns.prompt=[{prompt}]"
    return f"instruction rows: data.columns={{prompt: [{prompt}], response: {answer or '<column>'}}}"


def conversation(value: Any) -> str | None:
    """What reads a cell holding a conversation where text was expected."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, Mapping) and ("role" in m or "from" in m) for m in value)
    ):
        return "a conversation: task=causal_lm data.format=chat reads conversations (TRL's prompt + completion too)"
    return None
