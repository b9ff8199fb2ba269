"""Installed packages that cannot work together, named before anything imports them.

pip checks the requirements packages declare, but two that break peftc are declared nowhere pip
looks: GPU users install their own torch build, possibly after peftc and below its floor; and
torchao 0.18 (the `quant` extra's pin) dropped its code paths for torch < 2.11 without saying
so in its metadata. transformers imports torchao with every model class once it is installed, so
that pair turns every command, dry runs included, into an ImportError from deep inside torchao.
Both are read from package metadata here: nothing is imported.
"""

from __future__ import annotations

import re
from importlib import metadata

from peftc.errors import PeftcError

# The oldest torch the whole suite passes on (RESULTS.md, "The torch a GPU user brings");
# pyproject's `torch>=` says the same (tests/test_install.py holds them together).
TORCH_FLOOR = "2.8"


class InstallError(PeftcError):
    """The installed packages cannot work together; nothing was loaded or written."""


def release(version: str) -> tuple[int, ...]:
    """'2.8.0+cu128' -> (2, 8, 0): the numeric release, enough to compare against a floor."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def torch_needs() -> list[tuple[str, str, str]]:
    """(who, the torch it needs, a way out that keeps the user's torch) for what is installed."""
    needs = [("peftc", TORCH_FLOOR, "")]
    torchao = installed_version("torchao")
    if torchao is not None and release(torchao) >= (0, 18):
        needs.append((f"torchao {torchao}", "2.11", " or `pip uninstall torchao` (only quant=torchao_int8 uses it)"))
    return needs


def unmet_need() -> str | None:
    """What the installed packages need of torch and do not get, in one line; None if all fit."""
    torch = installed_version("torch")
    if torch is None:  # not installed: importing it says so plainly
        return None
    for who, floor, way_out in torch_needs():
        if release(torch) < release(floor):
            return (
                f"installed packages: {who} needs torch>={floor}, found torch {torch}; "
                f"install a torch>={floor} build for your CUDA (pytorch.org){way_out}"
            )
    return None


def check_installed() -> None:
    """Raise InstallError when the installed packages cannot work together."""
    problem = unmet_need()
    if problem is not None:
        raise InstallError(problem)
