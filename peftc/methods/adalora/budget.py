"""AdaLoRA's rank allocator (peft's RankAllocator semantics, 0.21 and 0.22) and the Lightning callback that
runs it after every optimizer step. Imported only when training (it imports Lightning).

Schedule over optimizer steps t = 1..T (T = total_step = trainer.max_steps):
  t <= tinit:                  budget = B0 = sum of init ranks, nothing masked;
  tinit < t < T - tfinal:      budget = int((B0 - B1) (1 - (t - tinit) / (T - tfinal - tinit))^3 + B1),
                               masked when t % deltaT == 0 (B1 = target_r * number of modules);
  t == T - tfinal:             final mask to B1, kept from then on (E re-zeroed every step).
Importance of every entry of A, E, B: I = |p * grad|, smoothed I' = b1 I' + (1 - b1) I and
U' = b2 U' + (1 - b2) |I - I'|; score s = I' U'. A triplet i scores s(E_i) + mean_j s(A_ij) +
mean_o s(B_oi); the (B0 - budget) lowest triplets get E_i = 0 (none while budget = B0).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from peftc.methods.adalora.layer import AdaLoraLayer

if TYPE_CHECKING:
    from peftc.planning.plan import Plan
    from peftc.runtime.model import PeftcModel

TENSORS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    def __init__(self, model: PeftcModel, plan: Plan) -> None:
        spec = plan.spec.peft
        self.name = plan.adapter_name
        self.spec = spec
        self.total_step = spec.total_step or plan.spec.trainer.max_steps
        self.layers: dict[str, AdaLoraLayer] = {s.path: model.base_model.get_submodule(s.path) for s in plan.sites}
        self.init_budget = sum(s.options["r"] for s in plan.sites)
        self.target_budget = spec.target_r * len(plan.sites)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_importance()

    def reset_importance(self) -> None:
        self.importance: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step)."""
        tinit, tfinal = self.spec.tinit, self.spec.tfinal
        if step <= tinit:
            return self.init_budget, False
        if step > self.total_step - tfinal:
            return self.target_budget, True
        progress = 1 - (step - tinit) / (self.total_step - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % self.spec.deltaT == 0

    def _params(self) -> list[tuple[tuple[str, str], torch.nn.Parameter]]:
        return [((path, t), getattr(layer, t)[self.name]) for path, layer in self.layers.items() for t in TENSORS]

    @torch.no_grad()
    def update_importance(self) -> None:
        """peft's update_ipt for every tensor at once (foreach ops: the same arithmetic in the same
        order, so the same bits, in a few launches instead of ~8 per tensor)."""
        b1, b2 = self.spec.beta1, self.spec.beta2
        keys, params = zip(*self._params(), strict=True)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        current = torch._foreach_mul(params, grads)
        torch._foreach_abs_(current)
        smooth = [self.importance[k] if k in self.importance else torch.zeros_like(p) for k, p in zip(keys, params)]
        spread = [self.uncertainty[k] if k in self.uncertainty else torch.zeros_like(p) for k, p in zip(keys, params)]
        importance = torch._foreach_mul(smooth, b1)
        torch._foreach_add_(importance, torch._foreach_mul(current, 1 - b1))
        deviation = torch._foreach_sub(current, importance)
        torch._foreach_abs_(deviation)
        uncertainty = torch._foreach_mul(spread, b2)
        torch._foreach_add_(uncertainty, torch._foreach_mul(deviation, 1 - b2))
        self.importance = dict(zip(keys, importance, strict=True))
        self.uncertainty = dict(zip(keys, uncertainty, strict=True))

    def _score(self, path: str, tensor: str) -> torch.Tensor:
        key = (path, tensor)
        return self.importance[key] * self.uncertainty[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        triplets = {}
        for path in self.layers:
            rows_a = self._score(path, "lora_A").mean(dim=1)
            cols_b = self._score(path, "lora_B").mean(dim=0)
            triplets[path] = self._score(path, "lora_E").view(-1) + (rows_a + cols_b)
        # a budget that has not shrunk (target_r == init_r) masks nothing: peft's kthvalue(k=0) fails there
        pruned_count = self.init_budget - budget
        scores = torch.cat(list(triplets.values()))
        threshold = torch.kthvalue(scores, k=pruned_count)[0].item() if pruned_count > 0 else -math.inf
        pattern = {}
        for path, layer in self.layers.items():
            pruned = triplets[path] <= threshold
            layer.lora_E[self.name].masked_fill_(pruned.view(-1, 1), 0.0)
            pattern[path] = (~pruned).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self) -> None:
        for path, keep in (self.rank_pattern or {}).items():
            e = self.layers[path].lora_E[self.name]
            e.masked_fill_(~torch.tensor(keep, device=e.device).view(-1, 1), 0.0)

    def step(self, step: int) -> None:
        """peft's update_and_allocate(step): call after the optimizer step, before zero_grad."""
        final = self.total_step - self.spec.tfinal
        if step < final:
            self.update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            self.rank_pattern = self.mask_to_budget(self.budget(step)[0])
            self.reset_importance()
        elif self.rank_pattern is not None:
            self.apply_pattern()


def finalize(model: PeftcModel, plan: Plan, pattern: dict[str, list[bool]] | None) -> None:
    """Cut the adapter to the kept triplets and record the plan with that rank_pattern."""
    if not pattern:
        return
    from peftc.planning import planner
    from peftc.planning.graph import graph_of

    for path, keep in pattern.items():
        model.base_model.get_submodule(path).keep_triplets(plan.adapter_name, keep)
    rank_pattern = {f"{path}.lora_E": keep for path, keep in pattern.items()}
    run = plan.spec.replace(peft=plan.spec.peft.replace(rank_pattern=rank_pattern))
    model.replace_plan(plan.adapter_name, planner.plan(run, graph_of(model.base_model)))


class AdaLoraBudget(L.Callback):
    """Runs the allocator once per optimizer step (not per accumulated batch) and prunes at the end."""

    def __init__(self, model: PeftcModel, plan: Plan) -> None:
        self.model = model
        self.plan = plan
        self.allocator = RankAllocator(model, plan)
        self.last_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done; the gradients of the last one are still there
        if step != self.last_step:
            self.last_step = step
            self.allocator.step(step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Rows masked before the last steps may have been revived by later updates: mask first,
        # so the pruned adapter computes exactly what the model computed.
        self.allocator.apply_pattern()
        finalize(self.model, self.plan, self.allocator.rank_pattern)
