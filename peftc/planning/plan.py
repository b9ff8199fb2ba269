"""The plan: plain, frozen, JSON-serializable data that says exactly what will be trained.

The dry run, the trainable-parameter count, what gets injected and what gets saved (tensors and
adapter_config.json) all come from one Plan, which the planner fills once; nothing here calls
method code. `fingerprint` hashes the canonical JSON of the stored data that shapes the run;
`adapter_fingerprint` hashes only what shapes the adapter's tensors (two plans with the same
adapter fingerprint produce interchangeable adapter files).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from peftc.config.spec import RunSpec, plain
from peftc.planning.layout import numel
from peftc.planning.memory import MemoryEstimate

if TYPE_CHECKING:
    from peftc.planning.graph import ModuleInfo

# 2: adapter_config and typed site/prompt fields stored (1: recomputed from the spec)
PLAN_FORMAT = 2
# Run-level switches that do not change what is trained.
_RUN_ONLY_KEYS = (
    "dry_run",
    "output_dir",
    "explain",
    "budget",
    "resume",
    "action",
    "adapter",
    "input",
    "input_file",
    "predict_samples",
)


@dataclass(frozen=True)
class ParameterTarget:
    """A targeted nn.Parameter (peft's target_parameters): its module, its name, its shape."""

    module: str
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Site:
    """One adapted module: where it is, what it wraps, and the tensors the adapter adds there.

    `tensors` maps peft's per-site tensor suffix (e.g. 'lora_A.weight') to its shape;
    `options` holds the method's own resolved settings, which only its layer reads (rank,
    scaling, ...). What code outside the method reads is a typed field.
    """

    path: str
    kind: str
    module_class: str
    in_features: int | None
    out_features: int | None
    tensors: dict[str, tuple[int, ...]]
    options: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0  # dropout on the adapter's input (the memory estimate counts its copy)
    save_base_weight: bool = False  # the file holds the base weight too (peft: targeted embeddings)
    base_quant: str | None = None  # the quantized base layer's storage format (set by planning)
    # The site whose adapter tensors this one uses (tied heads): it owns none of its `tensors`
    # (they count at that site) but may still save them under its own names, as peft does; none
    # but those named in `owns` (a tied head's own DoRA magnitude).
    shares_with: str | None = None
    owns: tuple[str, ...] = ()
    parameter: ParameterTarget | None = None  # the nn.Parameter a 'parameter' site adapts

    @classmethod
    def for_module(
        cls,
        module: ModuleInfo,
        tensors: dict[str, tuple[int, ...]],
        options: dict[str, Any] | None = None,
        **typed: Any,
    ) -> Site:
        """The site adapting `module` as a whole (its path, kind, class and features)."""
        return cls(
            module.path,
            module.kind,
            module.class_name,
            module.in_features,
            module.out_features,
            tensors,
            options or {},
            **typed,
        )

    @property
    def params(self) -> int:
        owned = self.owns if self.shares_with else self.tensors
        return sum(numel(self.tensors[name]) for name in owned)

    @property
    def settings(self) -> dict[str, Any]:
        """Its resolved settings, the method's and the typed ones, for grouping and diffs (the
        adapted parameter is left out: its path and shape show in the site's path and tensors)."""
        typed = ("dropout", "save_base_weight", "base_quant", "shares_with")
        return {**self.options, **{name: getattr(self, name) for name in typed}}

    @property
    def module_path(self) -> str:
        """The adapted module's path in the base model. peft nests wrappers (one per targeted
        parameter of a module: `experts.base_layer`), and a site's path is its wrapper's, as
        peft saves it."""
        return self.path.replace(".base_layer", "")


@dataclass(frozen=True)
class PromptPlan:
    """The prompt encoder of a prompt-learning method; every shape derived from the model config."""

    encoder: str
    num_virtual_tokens: int
    token_dim: int
    num_layers: int
    num_attention_heads: int
    num_transformer_submodules: int
    tensors: dict[str, tuple[int, ...]]
    options: dict[str, Any] = field(default_factory=dict)
    injection: str = ""  # one line for the plan: where the prompt enters the model
    prefix_kv: bool = False  # enters as per-layer key/value prefixes (prefix tuning), not embeddings
    saved: dict[str, tuple[int, ...]] = field(default_factory=dict)  # what the file holds (peft's names)

    @property
    def params(self) -> int:
        return sum(numel(s) for s in self.tensors.values())


@dataclass(frozen=True)
class SavedModule:
    """A base module trained in full and saved whole (peft's modules_to_save), e.g. a task head."""

    path: str
    module_class: str
    tensors: dict[str, tuple[int, ...]]
    reason: str = "config"
    # The saved module whose trained copy is this one's weight too (a head tied to the input
    # embedding, LoRA's ensure_weight_tying): saved under both names, trained and counted once.
    follows: str | None = None

    @property
    def params(self) -> int:
        return 0 if self.follows else sum(numel(s) for s in self.tensors.values())


@dataclass(frozen=True)
class SharedTensor:
    """A tensor of the adapter as a whole, not of one site (VeRA's random projections): its
    method creates it once from `options`, every site's layer reads it, and the adapter file
    holds it once, at `base_model.<name>`, when `saved` (otherwise loading recreates it)."""

    name: str
    shape: tuple[int, ...]
    saved: bool
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRef:
    name: str
    name_or_path: str | None
    model_type: str
    model_class: str
    dtype: str
    base_params: int
    base_bytes: int


@dataclass(frozen=True)
class QuantPlan:
    """How the frozen base is stored: which Linear modules a backend quantizes and what it costs.

    `bytes_by_dtype` is the whole base (quantized weights with their scales, everything else in
    the dtype it keeps), keyed by stored dtype; `merge_policy` says what merging an adapter into a
    quantized layer does ("requantize": dequantize, add, quantize again; "refuse").
    """

    backend: str
    storage: str
    modules: tuple[str, ...]
    skipped: tuple[str, ...]
    bytes_by_dtype: dict[str, int]
    merge_policy: str = "none"
    notes: tuple[str, ...] = ()
    from_checkpoint: bool = False  # the checkpoint is saved quantized: read as stored, not quantized

    @property
    def base_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())


@dataclass(frozen=True)
class Plan:
    method: str
    peft_type: str
    task: str
    task_type: str
    model: ModelRef
    quant: str
    sites: tuple[Site, ...]
    prompt: PromptPlan | None
    modules_to_save: tuple[SavedModule, ...]
    unfrozen: dict[str, tuple[int, ...]]  # base parameters made trainable (e.g. biases with bias='all')
    trainable_params: int
    total_params: int
    adapter_bytes: int
    memory: MemoryEstimate
    spec: RunSpec
    warnings: tuple[str, ...] = ()
    quantization: QuantPlan | None = None
    shared: tuple[SharedTensor, ...] = ()  # model-level tensors the method declares (see SharedTensor)
    # adapter_config.json as save writes it: peft's common fields and the method's own, resolved
    # (a null target_modules is the list of names the planner chose)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, float | bool] | None = None  # the estimate against budget.memory_gb, when set

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def adapter_name(self) -> str:
        return self.spec.adapter_name

    def site(self, path: str) -> Site | None:
        return next((s for s in self.sites if s.path == path), None)

    # ----------------------------------------------------------------------------------- data
    def to_dict(self) -> dict[str, Any]:
        data = {"format": PLAN_FORMAT}
        data.update({k: plain(v) if k == "spec" else _jsonable(v) for k, v in self._fields().items()})
        data["trainable_percent"] = round(self.trainable_percent, 6)
        data["memory"]["total"] = self.memory.total
        data["memory"]["budget"] = data.pop("budget")
        data["fingerprint"] = self.fingerprint
        data["adapter_fingerprint"] = self.adapter_fingerprint
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @property
    def fingerprint(self) -> str:
        """The stored data, less run-only switches and the raw method spec: its resolved form is
        the adapter_config (so `target_modules=null` and the list it resolves to are one plan)."""
        body = {k: plain(v) if k == "spec" else _jsonable(v) for k, v in self._fields().items()}
        for key in _RUN_ONLY_KEYS:
            body["spec"].pop(key, None)
        del body["spec"]["peft"], body["budget"]
        return _digest(body)

    def _fields(self) -> dict[str, Any]:
        """The plan's fields; `shared` only when a method declares shared tensors, and the
        quantization's `from_checkpoint` only when true, so that every other plan (and its
        fingerprint, which resume= and continued training compare) reads as before they existed."""
        fields = {k: v for k, v in self.__dict__.items() if k != "shared" or v}
        quantization = fields.get("quantization")
        if quantization is not None and not quantization.from_checkpoint:
            fields["quantization"] = {k: v for k, v in asdict(quantization).items() if k != "from_checkpoint"}
        return fields

    @property
    def adapter_fingerprint(self) -> str:
        body = {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "model": [self.model.model_type, self.model.model_class],
            "sites": [[s.path, s.tensors] for s in self.sites],
            "prompt": self.prompt.tensors if self.prompt else None,
            "modules_to_save": [[m.path, m.tensors] for m in self.modules_to_save],
            "unfrozen": self.unfrozen,
        }
        if self.shared:
            body["shared"] = [[t.name, t.shape, t.saved] for t in self.shared]
        return _digest(_jsonable(body))

    # ------------------------------------------------------------------------------ display
    def __str__(self) -> str:
        from peftc.planning.render import render_plan

        return render_plan(self)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _digest(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
