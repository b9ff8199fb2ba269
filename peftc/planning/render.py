"""Human-readable views of a plan (rich tables); the data itself lives in peftc.planning.plan."""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftc.planning.plan import Plan, Site


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _shape(tensors: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in tensors.items())


def plan_renderables(plan: Plan) -> list[Any]:
    from rich.table import Table

    from peftc.planning.memory import GIB, budget_verdict

    title = f"peftc plan  {plan.method} ({plan.peft_type}) · {plan.task} ({plan.task_type}) · {plan.model.name} [{plan.model.model_class}, {plan.model.dtype}]"
    out: list[Any] = [title]
    labels = getattr(plan.spec.task, "labels", None)
    if labels is not None:
        from rich.markup import escape

        out.append(escape(f"labels: [{', '.join(map(str, labels))}] ({len(labels)} classes, in class-index order)"))
    out.extend(_quantization_lines(plan))
    if plan.sites:
        groups = group_sites(plan.sites)
        table = Table(title=f"{len(plan.sites)} adapted modules", title_justify="left", show_lines=False)
        # Module names are what tells the rows apart: the other columns wrap before they shrink.
        table.add_column("module", min_width=max(len(label) for label, _ in groups), overflow="fold")
        for column, justify in (
            ("kind", "left"),
            ("in→out", "right"),
            ("sites", "right"),
            ("adapter tensors (per site)", "left"),
            ("params", "right"),
        ):
            table.add_column(column, justify=justify)
        for label, members in groups:
            first = members[0]
            quantized = first.base_quant
            table.add_row(
                f"{label} (follows {first.shares_with})" if first.shares_with else label,
                f"{first.module_class} ({quantized})" if quantized else first.module_class,
                f"{first.in_features}→{first.out_features}" if first.in_features is not None else "-",
                str(len(members)),
                _shape(first.tensors),
                f"{sum(s.params for s in members):,}",
            )
        out.append(table)
    if plan.prompt is not None:
        p = plan.prompt
        table = Table(title=f"prompt encoder: {p.encoder}", title_justify="left")
        for column in (
            "virtual tokens",
            "token dim",
            "layers",
            "attention heads",
            "submodules",
            "tensors",
            "params",
        ):
            table.add_column(column, justify="right")
        table.add_row(
            str(p.num_virtual_tokens),
            str(p.token_dim),
            str(p.num_layers),
            str(p.num_attention_heads),
            str(p.num_transformer_submodules),
            _shape(p.tensors),
            f"{p.params:,}",
        )
        out.append(table)
        if p.injection:
            out.append(f"prompt enters as: {p.injection}")
    if plan.modules_to_save:
        table = Table(title="modules trained in full and saved (modules_to_save)", title_justify="left")
        table.add_column("module", min_width=max(len(m.path) for m in plan.modules_to_save), overflow="fold")
        for column in ("class", "why", "params"):
            table.add_column(column)
        for m in plan.modules_to_save:
            table.add_row(m.path, m.module_class, m.reason, f"{m.params:,}")
        out.append(table)
    if plan.unfrozen:
        count = sum(_numel(s) for s in plan.unfrozen.values())
        out.append(f"base parameters made trainable: {len(plan.unfrozen)} tensors, {count:,} params")
    for shared in plan.shared:
        # Frozen and once per model: not in the trainable count, in the file only when saved.
        where = "saved once with the adapter" if shared.saved else "not saved: recreated when loading"
        out.append(f"shared by every site: {shared.name} {tuple(shared.shape)}, frozen, {where}")
    mem = plan.memory
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row(
        "trainable params",
        f"{plan.trainable_params:,} of {plan.total_params:,} ({plan.trainable_percent:.4f}%)",
    )
    summary.add_row("adapter file", human_bytes(plan.adapter_bytes))
    if plan.quantization is not None:
        by_dtype = " + ".join(f"{dtype} {human_bytes(n)}" for dtype, n in plan.quantization.bytes_by_dtype.items())
        summary.add_row("base weights", f"{human_bytes(plan.quantization.base_bytes)} = {by_dtype}")
    summary.add_row(
        "training memory (est.)",
        f"{human_bytes(mem.total)} = base {human_bytes(mem.base_weights)} + adapter {human_bytes(mem.adapter_weights)} + grads {human_bytes(mem.gradients)} + optimizer {human_bytes(mem.optimizer_state)} + activations {human_bytes(mem.activations)}",
    )
    if mem.prefix_kv:
        summary.add_row("", f"+ prefix key/values {human_bytes(mem.prefix_kv)}")
    for note in mem.notes:
        summary.add_row("", note)
    verdict = budget_verdict(plan)
    if verdict is not None:
        margin = human_bytes(abs(verdict["margin_gb"]) * GIB)
        summary.add_row(
            "memory budget",
            f"fits in budget.memory_gb={verdict['budget_gb']:g} ({margin} to spare)"
            if verdict["fits"]
            else f"does NOT fit budget.memory_gb={verdict['budget_gb']:g}: {margin} over",
        )
    summary.add_row("fingerprint", f"{plan.fingerprint} (adapter {plan.adapter_fingerprint})")
    out.append(summary)
    out.extend(f"warning: {w}" for w in plan.warnings)
    return out


def _quantization_lines(plan: Plan) -> list[str]:
    q = plan.quantization
    if q is None or q.backend == "none":
        return []
    kept = f"; kept in {plan.model.dtype}: {', '.join(q.skipped)}" if q.skipped else ""
    merge = {
        "requantize": "dequantize, add, quantize again (lossy)",
        "refuse": "refused (merge into the unquantized base)",
    }
    if q.from_checkpoint:
        merge["refuse"] = "refused (action=merge and save_merged merge into the dequantized weights)"
    stored = " (as the checkpoint is saved)" if q.from_checkpoint else ""
    lines = [
        f"base quantization: {q.backend}{stored}: {len(q.modules)} Linear modules stored as {q.storage}{kept}",
        f"merging into quantized layers: {merge.get(q.merge_policy, q.merge_policy)}",
    ]
    return lines + [f"note: {note}" for note in q.notes]


def _numel(shape: tuple[int, ...]) -> int:
    from peftc.planning.layout import numel

    return numel(shape)


def render_plan(plan: Plan, width: int = 140) -> str:
    """The plan as plain text (what `print(plan)` and `dry_run=true` show)."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False)
    for item in plan_renderables(plan):
        console.print(item)
    return buffer.getvalue()


def print_plan(plan: Plan) -> None:
    """The plan on stdout: as wide as the terminal, or, written to a file or a pipe, as wide as its
    content needs (nothing is cut for a reader who cannot widen the window)."""
    from rich.console import Console

    items = plan_renderables(plan)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(120, _natural_width(items)))
    for item in items:
        console.print(item)


def _natural_width(items: list[Any]) -> int:
    from rich.console import Console

    wide = Console(width=1000, file=io.StringIO())
    return max(wide.measure(item).maximum for item in items)


def group_sites(sites: tuple[Site, ...]) -> list[tuple[str, list[Site]]]:
    """Sites that differ only by their layer index, as ('model.layers.{0-31}.self_attn.q_proj', sites)."""
    groups: dict[tuple[Any, ...], list[Site]] = defaultdict(list)
    for site in sites:
        pattern = re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "#", site.path)
        key = (
            pattern,
            site.kind,
            site.in_features,
            site.out_features,
            tuple(sorted(site.tensors.items())),
            tuple(sorted((k, str(v)) for k, v in site.settings.items())),
        )
        groups[key].append(site)
    result = []
    for key, members in groups.items():
        indices = [_first_index(s.path) for s in members]
        label = (
            key[0].replace("#", "{" + _ranges(indices) + "}", 1).replace("#", "*")
            if None not in indices and len(members) > 1
            else members[0].path
        )
        result.append((label, members))
    return result


def _first_index(path: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _ranges(indices: list[int]) -> str:
    values = sorted(set(indices))
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(parts)
