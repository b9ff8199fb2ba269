"""The package is the pipeline: imports point one way (config -> planning -> plug-ins -> runtime ->
files -> training -> cli), function-level imports included, and there is no import cycle.

Imports under `if TYPE_CHECKING:` are left out: they never run, so they cannot form a cycle, and
annotations may name a type from anywhere. Every other `import`, at any depth, counts: a cycle
hidden behind a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftc"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("peftc.errors", "peftc.installed", "peftc.noise", "peftc.version"),
    ("peftc.config", "peftc.conf"),
    ("peftc.planning",),
    ("peftc.methods", "peftc.tasks", "peftc.quant"),  # plug-ins: peers, through contracts only
    ("peftc.runtime",),
    ("peftc.files",),
    ("peftc.training",),
    ("peftc.cli",),
)
# Entry points above everything: the public surface and the `python -m` shims.
ENTRY_POINTS = {"peftc", "peftc.__main__", "peftc.diff"}
PLUGIN_PACKAGES = LAYERS[3]
# What one plug-in family may use of another: its registry and its contract, never its internals.
PLUGIN_CONTRACTS = {name for package in PLUGIN_PACKAGES for name in (package, f"{package}.base")}

# Imports against the direction that this redesign step has not untangled yet, each with what it
# needs. The list may only shrink: an entry that no longer occurs fails the test, so fixing one
# means deleting its line here.
KNOWN_DEBT: dict[tuple[str, str], str] = {
    ("peftc.runtime.model", "peftc.files.adapter_files"): "PeftcModel.save_adapter and the layout check on "
    "load_adapter_tensors: the public model API writes and checks files",
    ("peftc.methods.prompt.multitask_prompt_tuning", "peftc.files.tensorfile"): "prompt_tuning_init from a "
    "source adapter file reads its safetensors header when the encoder is built",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found["peftc.conf"] = ROOT / "conf" / "__init__.py"
    return found


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if modules()[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If) and isinstance(test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(test)
    )


def imported_modules(name: str) -> set[str]:
    """Every peftc module this module imports, at any depth, outside TYPE_CHECKING blocks."""
    tree = ast.parse(modules()[name].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {target for target in found if target in modules() and target != name}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(imported_modules(name)) for name in modules()}


def layer_of(name: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in layer):
            return index
    return None


def plugin_family(name: str) -> str | None:
    return next((p for p in PLUGIN_PACKAGES if name == p or name.startswith(p + ".")), None)


def violation(importer: str, imported: str) -> str | None:
    """Why this import is against the direction, or None when it is allowed."""
    if importer in ENTRY_POINTS:
        return None
    if imported in ENTRY_POINTS:
        return "imports an entry point (the public surface is for users, not for peftc's own modules)"
    low, high = layer_of(importer), layer_of(imported)
    if low is None or high is None:
        return f"is outside the layers ({importer if low is None else imported})"
    if high > low:
        return f"imports upward (layer {LAYERS[high]} from layer {LAYERS[low]})"
    family, other = plugin_family(importer), plugin_family(imported)
    if family and other and family != other and imported not in PLUGIN_CONTRACTS:
        return "reaches into another plug-in family's internals"
    return None


def violations() -> dict[tuple[str, str], str]:
    return {
        (importer, imported): why
        for importer, targets in import_graph().items()
        for imported in targets
        if (why := violation(importer, imported))
    }


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_every_module_sits_in_a_layer() -> None:
    outside = [name for name in modules() if name not in ENTRY_POINTS and layer_of(name) is None]
    assert not outside, f"modules outside the pipeline layers: {outside}"


def test_imports_point_one_way() -> None:
    new = {edge: why for edge, why in violations().items() if edge not in KNOWN_DEBT}
    assert not new, "\n".join(f"{a} -> {b}: {why}" for (a, b), why in sorted(new.items()))


def test_the_known_debt_list_only_shrinks() -> None:
    fixed = sorted(edge for edge in KNOWN_DEBT if edge not in violations())
    assert not fixed, f"no longer violated, delete from KNOWN_DEBT: {fixed}"


def test_no_import_cycles() -> None:
    # The cycles that remain run through the known upward imports; cutting those must leave none.
    downward = {
        name: frozenset(t for t in targets if (name, t) not in KNOWN_DEBT) for name, targets in import_graph().items()
    }
    assert not cycles(downward), cycles(downward)


def test_the_checker_sees_function_level_imports_and_cycles() -> None:
    graph = import_graph()
    assert "peftc.planning.render" in graph["peftc.cli.run"]  # module level
    assert "peftc.files.load" in graph["peftc.cli.run"]  # inside execute()
    assert cycles({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}) == [
        ["a", "b", "c"]
    ]
    assert violation("peftc.planning.plan", "peftc.runtime.model")
    assert violation("peftc.methods.lora.layer", "peftc.tasks.causal_lm")
    assert not violation("peftc.methods.lora.layer", "peftc.tasks.base")


def test_the_wheel_lists_every_package() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert declared == packages, f"pyproject.toml [tool.setuptools] packages differ: {sorted(declared ^ packages)}"


HEAVY = ("lightning", "pytorch_lightning", "bitsandbytes", "optimum.quanto", "torchao", "peft")
# One fresh interpreter: what transformers itself imports with any model class first, then each
# dry run in turn. A module only ever joins sys.modules, so a dry run that imported anything
# beyond the baseline shows in the set printed after it, whatever ran before it.
PROBE = """
import runpy, sys
from hydra.core.global_hydra import GlobalHydra
heavy, run_dir, quants = {heavy!r}, sys.argv[1], sys.argv[2:]
def report(name):
    print("LOADED", name, sorted(h for h in heavy if h in sys.modules))
import transformers.modeling_utils
report("baseline")
for quant in quants:
    sys.argv = ["peftc", "dry_run=true", "quant=" + quant, "hydra.run.dir=" + run_dir + "/" + quant]
    try:
        runpy.run_module("peftc", run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, exc.code
    GlobalHydra.instance().clear()
    report(quant)
"""


def loaded_heavy(run_dir: Path, quants: list[str]) -> dict[str, set[str]]:
    """The heavy modules loaded at the baseline and after each quant's dry run (see PROBE)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), str(run_dir), *quants],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("LOADED ")]
    return {name: set(ast.literal_eval(names)) for name, names in reports}


@pytest.mark.slow
def test_a_dry_run_imports_no_trainer_and_no_quantization_backend(tmp_path: Path) -> None:
    # transformers imports torchao with every model class once it is installed: that much is not ours.
    quants = ["none", "bnb_nf4", "quanto_int8"]
    loaded = loaded_heavy(tmp_path, quants)
    assert set(loaded) == {"baseline", *quants}, loaded
    for quant in quants:
        assert loaded[quant] <= loaded["baseline"], (quant, loaded[quant] - loaded["baseline"])


def test_every_method_keeps_exactly_one_of_the_two_contracts_and_fills_it() -> None:
    """Injectable or prompt, never a switch inside one class: each registered method subclasses
    one contract, implements every hook that contract leaves open, and has none of the other's."""
    from peftc import methods
    from peftc.methods.base import InjectableMethod, PromptMethod
    from peftc.methods.layer import AdapterLayer

    required = {
        InjectableMethod: ("plan_site", "peft_config", "spec_from_peft_config"),
        PromptMethod: (
            "plan_prompt",
            "saved_prompt_tensors",
            "create_prompt_encoder",
            "prompt_tensors",
            "load_prompt_tensors",
            "peft_config",
            "spec_from_peft_config",
        ),
    }
    for name, method in methods.all_methods().items():
        contract = InjectableMethod if isinstance(method, InjectableMethod) else PromptMethod
        other = PromptMethod if contract is InjectableMethod else InjectableMethod
        assert isinstance(method, contract) and not isinstance(method, other), name
        assert method.kind == contract.kind, name
        unfilled = [hook for hook in required[contract] if getattr(type(method), hook) is getattr(contract, hook)]
        assert not unfilled, f"{name} leaves {unfilled} of {contract.__name__} open"
        foreign = [hook for hook in required[other] if hook not in required[contract]]
        assert not [hook for hook in foreign if hasattr(method, hook)], f"{name} carries the other contract's hooks"
        if contract is InjectableMethod:
            assert issubclass(method.layer_class, AdapterLayer), name
            if type(method).plan_shared is not InjectableMethod.plan_shared:
                assert type(method).create_shared is not InjectableMethod.create_shared, name
