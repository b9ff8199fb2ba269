"""spec + model graph -> Plan. Pure: builds the graph on the meta device and loads no weights."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from peftc.config.names import check_adapter_name_fits
from peftc.config.registry import METHODS, QUANT_BACKENDS, TASKS
from peftc.errors import PlanError, did_you_mean
from peftc.planning import compat, layout, memory, model_source
from peftc.planning.graph import ModelGraph, meta_graph
from peftc.planning.plan import ModelRef, Plan, SavedModule, SharedTensor, Site
from peftc.planning.quantization import annotate_sites, checkpoint_quantization, plan_quantization
from peftc.planning.targets import resolve_targets

if TYPE_CHECKING:
    from collections.abc import Callable

    from peftc.config.spec import RunSpec
    from peftc.methods.base import Method
    from peftc.tasks.base import Task


def plan(run: RunSpec, graph: ModelGraph | None = None, *, strict_targets: bool = True) -> Plan:
    """Resolve a validated spec against the model's module graph.

    `graph` defaults to the meta-device graph of `run.model` with the task's head; pass the
    graph of a live model to plan onto it (loading adapters). `strict_targets=False` accepts
    target entries that match nothing (peft's tolerance, for adapters written elsewhere).
    """
    method = METHODS.for_spec(run.peft)
    task = TASKS.for_spec(run.task)
    resolved_task = task.with_data_settings(run)
    if resolved_task is not run.task:
        run = run.replace(task=resolved_task)
    backend = QUANT_BACKENDS.for_spec(run.quant)
    context = compat.Context(method.name, task.name, backend.name, run.trainer.strategy, run)
    compat.check(context)
    backend.check_available()
    stored = None
    if graph is None:
        run, stored = checkpoint_quantization(run, backend)
        graph = meta_graph(run.model, task.auto_class_name, task.config_overrides(run.task))
        # Planning from the config is the run's path: its tokenizer must exist and fit, now.
        model_source.check_tokenizer(run.model, graph.facts.vocab_size)
    run = run.replace(peft=method.spec_for_model(run.peft, graph))
    compat.check(compat.Context(method.name, task.name, backend.name, run.trainer.strategy, run, graph))
    check_adapter_name_fits("adapter_name", run.adapter_name, (m.path for m in graph.modules))
    method.check_run(run.peft, run, graph)

    saved = _modules_to_save(method, task, run, graph, strict=strict_targets)
    sites: tuple[Site, ...] = ()
    shared: tuple[SharedTensor, ...] = ()
    if method.kind == "injectable":
        protected = [m.path for m in saved]
        modules = resolve_targets(
            method.target_request(run.peft),
            method,
            graph,
            protected=protected,
            strict=strict_targets,
        )
        modules = method.select_targets(run.peft, modules, graph)
        sites = tuple(method.plan_site(run.peft, module, graph) for module in modules)
        sites += method.extra_sites(run.peft, graph, sites)
        shared = method.plan_shared(run.peft, graph, sites)
    quantization = plan_quantization(
        backend, run.quant, graph, run.model.dtype, protected=[m.path for m in saved], stored=stored
    )
    sites = annotate_sites(sites, quantization)
    prompt = method.plan_prompt(run.peft, graph, task, run) if method.kind == "prompt" else None
    if prompt is not None:  # the encoder saves its output, not its parameters (peft's prompt_embeddings)
        prompt = replace(prompt, saved=method.saved_prompt_tensors(prompt))
    # A module saved whole trains its own copy; its base parameters are not also unfrozen in place.
    in_place = method.plan_unfrozen(run.peft, graph, sites) if method.kind == "injectable" else {}
    unfrozen = {
        name: shape for name, shape in in_place.items() if not any(name.startswith(m.path + ".") for m in saved)
    }

    adapter_params = sum(s.params for s in sites) + (prompt.params if prompt else 0)
    saved_params = sum(m.params for m in saved)
    unfrozen_params = sum(_numel(shape) for shape in unfrozen.values())
    base_bytes = quantization.base_bytes
    dtype_bytes = memory.DTYPE_BYTES.get(run.model.dtype, 4)
    draft = Plan(
        method=method.name,
        peft_type=method.peft_type,
        task=task.name,
        task_type=task.task_type,
        model=ModelRef(
            run.model.label,
            run.model.name_or_path,
            graph.model_type,
            graph.model_class,
            run.model.dtype,
            graph.total_params,
            base_bytes,
        ),
        quant=backend.name,
        sites=sites,
        prompt=prompt,
        modules_to_save=tuple(saved),
        unfrozen=unfrozen,
        trainable_params=adapter_params + saved_params + unfrozen_params,
        total_params=graph.total_params + adapter_params + saved_params,
        adapter_bytes=0,
        memory=memory.estimate(
            run,
            graph,
            base_bytes,
            # shared tensors (VeRA's projections) are float32 buffers beside the adapter: memory, not trained
            (adapter_params + sum(_numel(t.shape) for t in shared)) * memory.FP32 + saved_params * dtype_bytes,
            adapter_params + saved_params + unfrozen_params,
            prompt=prompt,
            sites=sites,
        ),
        spec=run,
        warnings=method.plan_warnings(run.peft, sites, graph)
        + _tied_weight_warnings(graph, sites, saved, lambda others: method.tying_hint(run.peft, graph, others)),
        quantization=quantization,
        shared=shared,
    )
    return _completed(draft, method)


def _completed(draft: Plan, method: Method) -> Plan:
    """The draft with what is derived from it: the file's size, adapter_config.json (the method
    resolves its fields against the planned sites, once, here) and the budget verdict."""
    draft = replace(draft, adapter_bytes=layout.safetensors_size(layout.saved_layout(draft)))
    config = layout.adapter_config(draft, method.peft_config(draft.spec.peft, draft))
    return replace(draft, adapter_config=config, budget=memory.budget_verdict(draft))


def _tied_weight_warnings(
    graph: ModelGraph, sites: tuple[Site, ...], saved: list[SavedModule], hint: Callable[[list[str]], str]
) -> tuple[str, ...]:
    """peft's warning for an adapted module whose weight another module shares (an input embedding
    and its output head, tie_word_embeddings): the other module does not follow the adapter, so a
    merge changes both (merged outputs differ from the adapter's), and a trained copy is not seen
    by the other. A head whose site shares the embedding's rows (trainable tokens) follows them.
    `hint(others)`: the method's way to tie them, if it has one (Method.tying_hint)."""
    following = {s.module_path for s in sites if s.shares_with}
    notes = []
    for path in dict.fromkeys(s.module_path for s in sites if not s.shares_with):
        if others := sorted(graph.weight_shared_with(path) - following):
            notes.append(
                f"peft.target_modules adapts {path}, whose weight {', '.join(others)} shares (tied weights): "
                f"the adapter does not reach {others[0]}, and merging it changes {others[0]} too, so a merged model "
                f"gives other outputs than the adapter (as in peft){hint(others)}"
            )
    following = {m.path for m in saved if m.follows}
    for module in saved:
        if module.follows:
            continue
        if others := sorted(graph.weight_shared_with(module.path) - following):
            notes.append(
                f"peft.modules_to_save trains a copy of {module.path}, whose weight {', '.join(others)} shares "
                f"(tied weights): {others[0]} keeps the base weight, not the trained copy (as in peft){hint(others)}"
            )
    return tuple(notes)


def _numel(shape: tuple[int, ...]) -> int:
    from peftc.planning.plan import numel

    return numel(shape)


def _modules_to_save(
    method: Method, task: Task, run: RunSpec, graph: ModelGraph, *, strict: bool = True
) -> list[SavedModule]:
    """The task's head (peft keeps classifier/score/qa_outputs trainable) plus the user's list.

    Not strict (loading a file): names matching nothing are skipped, as peft does; peft itself
    writes ["classifier", "score", "pre_classifier"] into every SEQ_CLS adapter_config.json, whatever the
    model has.
    """
    chosen: dict[str, str] = {}
    for name in task.head_modules:
        module = graph.module(name)
        if module is not None:
            chosen[module.path] = f"{task.name} head"
    for entry in method.modules_to_save(run.peft):
        matches = [m for m in graph.modules if m.path and (m.path == entry or m.path.endswith("." + entry))]
        if not matches and (entry in task.head_modules or not strict):
            continue  # peft writes every head name of the task (classifier and score) into its configs
        if not matches:
            hint = did_you_mean(entry, graph.leaf_names() | {m.path for m in graph.modules})
            raise PlanError(
                "peft.modules_to_save",
                entry,
                f"no module named {entry!r} in {graph.model_class}",
                hint,
            )
        for module in matches:
            chosen.setdefault(module.path, "config")
    saved = []
    for path, reason in chosen.items():
        tensors = {}
        for info in graph.subtree(path):
            rel = info.path[len(path) + 1 :] if info.path != path else ""
            for pname, shape in info.params:
                tensors[f"{rel}.{pname}" if rel else pname] = shape
        saved.append(SavedModule(path, graph.module(path).class_name, tensors, reason))
    for follower, owner in method.tied_modules(run.peft, graph).items():
        if owner in chosen and follower not in chosen:  # its weight is the owner's trained copy
            module = graph.module(follower)
            weight = {"weight": dict(module.params)["weight"]}
            saved.append(SavedModule(follower, module.class_name, weight, f"tied: follows {owner}", owner))
    return saved
