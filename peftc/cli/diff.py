"""Plan diff: what changes between two override sets, before anything loads.

    python -m peftc.diff peft.r=8 -- peft.r=16 peft.target_modules=all-linear

Compiles both (meta device, no weights) and shows the config keys that differ, the adapted
sites added / removed / changed, the trainable-parameter and memory deltas, and whether an
adapter saved by one loads into the other (same method and the same tensor names and shapes
in adapter_model.safetensors, i.e. the same adapter fingerprint). Exit status 0, or 2 on a
config error in either side.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftc.planning.plan import Plan, Site

MEMORY_PARTS = ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations", "prefix_kv")


@dataclass(frozen=True)
class PlanDiff:
    a: Plan
    b: Plan
    config: dict[str, tuple[Any, Any]]  # changed config keys: key -> (value in a, value in b)
    added: tuple[Site, ...]
    removed: tuple[Site, ...]
    changed: tuple[tuple[Site, Site], ...]
    loads: bool
    load_problems: tuple[str, ...] = field(default=())

    @property
    def trainable_delta(self) -> int:
        return self.b.trainable_params - self.a.trainable_params

    @property
    def memory_delta(self) -> int:
        return self.b.memory.total - self.a.memory.total


def diff_plans(a: Plan, b: Plan) -> PlanDiff:
    sites_a, sites_b = {s.path: s for s in a.sites}, {s.path: s for s in b.sites}
    changed = tuple(
        (sites_a[p], sites_b[p])
        for p in sites_a
        if p in sites_b and (sites_a[p].tensors != sites_b[p].tensors or sites_a[p].settings != sites_b[p].settings)
    )
    problems = adapter_load_problems(a, b)
    return PlanDiff(
        a=a,
        b=b,
        config=config_changes(a, b),
        added=tuple(s for p, s in sites_b.items() if p not in sites_a),
        removed=tuple(s for p, s in sites_a.items() if p not in sites_b),
        changed=changed,
        loads=not problems,
        load_problems=tuple(problems),
    )


def config_changes(a: Plan, b: Plan) -> dict[str, tuple[Any, Any]]:
    flat_a, flat_b = _flatten(a.spec.to_dict()), _flatten(b.spec.to_dict())
    return {
        k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b)) if flat_a.get(k) != flat_b.get(k)
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def adapter_load_problems(a: Plan, b: Plan) -> list[str]:
    """Why an adapter file written for one plan would not load strictly into the other."""
    from peftc.planning.layout import saved_layout

    if a.peft_type != b.peft_type:
        return [f"different methods: {a.method} ({a.peft_type}) vs {b.method} ({b.peft_type})"]
    if a.model.model_class != b.model.model_class:
        return [f"different base models: {a.model.model_class} vs {b.model.model_class}"]
    layout_a, layout_b = saved_layout(a), saved_layout(b)
    problems = [f"only in A: {name}" for name in layout_a if name not in layout_b]
    problems += [f"only in B: {name}" for name in layout_b if name not in layout_a]
    problems += [
        f"shape differs: {name} {_shape(layout_a[name][0])} vs {_shape(layout_b[name][0])}"
        for name in layout_a
        if name in layout_b and layout_a[name][0] != layout_b[name][0]
    ]
    return problems


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _site_change(a: Site, b: Site) -> str:
    parts = [
        f"{name} {_shape(a.tensors[name]) if name in a.tensors else '-'} → {_shape(b.tensors[name]) if name in b.tensors else '-'}"
        for name in dict.fromkeys([*a.tensors, *b.tensors])
        if a.tensors.get(name) != b.tensors.get(name)
    ]
    settings_a, settings_b = a.settings, b.settings
    parts += [
        f"{key} {settings_a.get(key)!r} → {settings_b.get(key)!r}"
        for key in dict.fromkeys([*settings_a, *settings_b])
        if settings_a.get(key) != settings_b.get(key)
    ]
    return "; ".join(parts)


def render_diff(diff: PlanDiff) -> list[Any]:
    from rich.markup import escape
    from rich.table import Table

    from peftc.planning.render import group_sites, human_bytes

    a, b = diff.a, diff.b
    out: list[Any] = [f"plan diff  A {a.fingerprint} ({a.method})  →  B {b.fingerprint} ({b.method})"]
    if diff.config:
        table = Table(title="config keys that differ", title_justify="left")
        for column in ("key", "A", "B"):
            table.add_column(column)
        for key, (va, vb) in diff.config.items():
            table.add_row(key, escape(repr(va)), escape(repr(vb)))
        out.append(table)
    sites = Table(title="adapted sites", title_justify="left")
    for column in ("change", "module", "detail"):
        sites.add_column(column)
    for label, members in group_sites(diff.added):
        sites.add_row("+ added", label, f"{sum(s.params for s in members):,} params")
    for label, members in group_sites(diff.removed):
        sites.add_row("- removed", label, f"{sum(s.params for s in members):,} params")
    after = {site_a.path: site_b for site_a, site_b in diff.changed}
    for label, members in group_sites(tuple(site_a for site_a, _ in diff.changed)):
        sites.add_row("~ changed", label, escape(_site_change(members[0], after[members[0].path])))
    unchanged = len(a.sites) - len(diff.removed) - len(diff.changed)
    sites.caption = f"{unchanged} sites unchanged"
    out.append(sites)
    summary = Table(show_header=True, title="totals", title_justify="left")
    for column in ("", "A", "B", "delta"):
        summary.add_column(column, justify="right")
    summary.add_row(
        "trainable params", f"{a.trainable_params:,}", f"{b.trainable_params:,}", f"{diff.trainable_delta:+,}"
    )
    summary.add_row(
        "adapter file",
        human_bytes(a.adapter_bytes),
        human_bytes(b.adapter_bytes),
        _signed(b.adapter_bytes - a.adapter_bytes),
    )
    for part in (*MEMORY_PARTS, "total"):
        va, vb = (getattr(p.memory, part) for p in (a, b))
        if va or vb:
            summary.add_row(f"memory: {part.replace('_', ' ')}", human_bytes(va), human_bytes(vb), _signed(vb - va))
    out.append(summary)
    if diff.loads:
        verdict = "an adapter saved by either plan loads into the other (same tensors)"
        if a.adapter_fingerprint == b.adapter_fingerprint and diff.config:
            verdict += "; the file's own adapter_config.json settings apply"
        out.append(f"adapter compatibility: yes: {verdict}")
    else:
        shown = "\n  ".join(escape(p) for p in diff.load_problems[:8])
        more = f"\n  ... and {len(diff.load_problems) - 8} more" if len(diff.load_problems) > 8 else ""
        out.append(f"adapter compatibility: NO: an adapter from one does not load into the other:\n  {shown}{more}")
    return out


def _signed(delta: int) -> str:
    from peftc.planning.render import human_bytes

    return ("+" if delta > 0 else "-" if delta < 0 else "±") + human_bytes(abs(delta))


def main(argv: list[str] | None = None) -> int:
    """`python -m peftc.diff <overrides A> -- <overrides B>`."""
    from rich.console import Console

    from peftc.config.compose import compose, to_spec
    from peftc.errors import PeftcError
    from peftc.planning import planner

    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m peftc.diff <overrides A> -- <overrides B>"
    if args in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + usage)
        return 0
    if "--" not in args:  # a mistake: one line on stderr, as every other command gives
        print(
            f"error: the two override sets must be separated by -- ({usage.removeprefix('usage: ')})", file=sys.stderr
        )
        return 2
    cut = args.index("--")
    plans = []
    for side, overrides in (("A", args[:cut]), ("B", args[cut + 1 :])):
        try:
            plans.append(planner.plan(to_spec(compose(overrides))))
        except PeftcError as exc:
            print(f"error: {side}: {exc}", file=sys.stderr)
            return exc.exit_code
    console = Console(width=max(120, Console().width))
    for item in render_diff(diff_plans(*plans)):
        console.print(item)
    return 0


if __name__ == "__main__":
    sys.exit(main())
