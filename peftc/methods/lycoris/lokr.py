"""LoKr (LyCORIS): y = W x + dW x, dW = (alpha / r) * W1 ⊗ W2 (Kronecker product).

With out = a * b and in = c * d (`factorization`: the most balanced divisor pairs, or
`decompose_factor` when it divides), W1 is (a, c) and W2 is (b, d). W2 is a full matrix when
r >= max(b, d) / 2, else the rank-r product W2a W2b; W1 is full unless `decompose_both` and
r < max(a, c) / 2. For a convolution (in = input channels per group) W2 also spans the
kernel: full (b, d, kernel), the CP form T ×1 W2a ×2 W2b with use_effective_conv2d, or
W2a W2b over d * kernel columns. Default init: W1 (or W1a) zero, an exact no-op; "lycoris": W2
(or W2b) zero instead; false: all random. See `lycoris.py` for dropout and merging.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from peftc.config.spec import RunSpec, param
from peftc.errors import ConfigError
from peftc.methods import register
from peftc.methods.common import flag, integer
from peftc.methods.lycoris.shared import (
    LycorisLayer,
    LycorisMethod,
    LycorisSpec,
    conv_geometry,
    core_shape,
    kernel_size,
)
from peftc.planning.graph import ModuleInfo
from peftc.planning.layout import WEIGHTS_NAME, model_prefix
from peftc.planning.plan import Plan


@dataclass
class LoKrSpec(LycorisSpec):
    init_weights: Any = param(
        True,
        "true: W1 starts at zero (no-op); 'lycoris': W2 starts at zero (no-op); false: all random (not a no-op).",
    )
    decompose_both: bool = param(False, "Also write W1 as a rank-r product when r < max(W1's dims) / 2.")
    decompose_factor: int = param(
        -1, "Split each dimension as (factor, dim / factor) when factor divides it; -1: most balanced split."
    )
    rank_dropout_scale: bool = param(False, "Rescale the rows kept by rank_dropout by 1 / their mean.")

    init_choices: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")

    def cross_check(self, key: str, run: RunSpec | None) -> None:
        super().cross_check(key, run)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"{key}.decompose_factor", self.decompose_factor, "must be -1 or a positive integer")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: (factor, dimension / factor) when factor divides
    it, else the pair of divisors closest to the square root whose smaller one is <= factor
    (peft's search: e.g. 64 -> (8, 8), 128 -> (8, 16), 127 -> (1, 127))."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class LoKrLayer(LycorisLayer):
    adapter_containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def zero_initialised(self, suffix: str, init: Any) -> bool:
        if init is True:
            return suffix in ("lokr_w1", "lokr_w1_a")
        if init == "lycoris":
            return suffix in ("lokr_w2", "lokr_w2_b")
        return False

    def _factor(self, name: str, full: str) -> torch.Tensor:
        container = getattr(self, full)
        if name in container:
            return container[name]
        return getattr(self, f"{full}_a")[name] @ getattr(self, f"{full}_b")[name]

    def factored_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name in self.lokr_t2:
            return None
        first, second = self._factor(name, "lokr_w1"), self._factor(name, "lokr_w2")
        return kronecker_linear(x.to(first.dtype), first, second)

    def product(self, name: str) -> torch.Tensor:
        first = self._factor(name, "lokr_w1")
        if name in self.lokr_t2:  # CP form: out_k x in_n x kernel
            second = torch.einsum(
                "i j k l, i p, j r -> p r k l", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name]
            )
        else:
            second = self._factor(name, "lokr_w2")
        if second.dim() == 4:
            first = first[:, :, None, None]
        # kron views its input; the CP einsum's output can carry strides kron cannot view (a
        # Conv1d core k x 1: peft 0.21 and 0.22 fail there), so hand it a freshly laid-out copy.
        return torch.kron(first, second.clone(memory_format=torch.contiguous_format))


def kronecker_linear(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """x (W1 ⊗ W2)^T without forming the Kronecker product: with W1 (a, c), W2 (b, d) and each
    input row read as a c x d matrix X, the output row is W1 X W2^T read as a x b. Two small
    GEMMs instead of one (N, c d)(c d, a b), in the cheaper order: X W2^T first costs
    c b (d + a) per token, W1 X first a d (c + b)."""
    (a, c), (b, d) = first.shape, second.shape
    leading = x.shape[:-1]
    tokens = x.numel() // (c * d)
    if c * b * (d + a) <= a * d * (c + b):
        by_second = (x.reshape(-1, d) @ second.T).reshape(tokens, c, b).transpose(0, 1).reshape(c, tokens * b)
        product = (first @ by_second).reshape(a, tokens, b).transpose(0, 1)
    else:
        columns = x.reshape(tokens, c, d).transpose(0, 1).reshape(c, tokens * d)
        by_first = (first @ columns).reshape(a, tokens, d).transpose(0, 1).reshape(tokens * a, d)
        product = by_first @ second.T
    return product.reshape(*leading, a * b)


@register
class LoKr(LycorisMethod):
    name = "lokr"
    peft_type = "LOKR"
    schema = LoKrSpec
    layer_class = LoKrLayer
    tensor_prefix = "lokr_"

    def site_tensors(self, spec: LoKrSpec, module: ModuleInfo, r: int) -> tuple[dict[str, tuple[int, ...]], dict]:
        in_g, kernel, effective = conv_geometry(spec, module)
        out_l, out_k = factorization(module.out_features, spec.decompose_factor)
        in_m, in_n = factorization(in_g, spec.decompose_factor)
        tensors: dict[str, tuple[int, ...]] = {}
        if spec.decompose_both and r < max(out_l, in_m) / 2:
            tensors.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
        else:
            tensors["lokr_w1"] = (out_l, in_m)
        if r >= max(out_k, in_n) / 2:
            tensors["lokr_w2"] = (out_k, in_n, *kernel)
        elif effective:
            tensors.update(lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n), lokr_t2=core_shape(r, kernel))
        else:
            tensors.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * kernel_size(kernel)))
        return tensors, {"kron": [[out_l, out_k], [in_m, in_n]]}

    def peft_config(self, spec: LoKrSpec, plan: Plan) -> dict[str, Any]:
        return {
            **super().peft_config(spec, plan),
            "decompose_both": spec.decompose_both,
            "decompose_factor": spec.decompose_factor,
            "rank_dropout_scale": spec.rank_dropout_scale,
        }

    def spec_from_peft_config(self, config: Mapping[str, Any]) -> LoKrSpec:
        init = config.get("init_weights", True)
        return LoKrSpec(
            **self.spec_kwargs(config),
            init_weights=init if init in LoKrSpec.init_choices else flag(config, "init_weights", True),
            decompose_both=flag(config, "decompose_both", False),
            decompose_factor=integer(config, "decompose_factor", -1),
            rank_dropout_scale=flag(config, "rank_dropout_scale", False),
        )

    def tensors_from_file(
        self, plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
    ) -> dict[str, torch.Tensor]:
        return unscaled_before_peft_0_14(plan, tensors, config, directory)


def unscaled_before_peft_0_14(
    plan: Plan, tensors: dict[str, torch.Tensor], config: Mapping[str, Any], directory: Path
) -> dict[str, torch.Tensor]:
    """A file of peft < 0.14, whose LoKr update was W1 ⊗ W2 with no alpha / r, as an adapter of
    today's formula with the same outputs: W1 (or W1a) divided by each site's alpha / r, with one
    warning. peft 0.22 loads such a file as it is and scales its update by alpha / r (its
    outputs change); saved again by peftc (with rank_dropout_scale), it means the same to both."""
    if "rank_dropout_scale" in config:  # every LoKr config of peft >= 0.14 has the field
        return tensors
    prefix, converted = model_prefix(plan), dict(tensors)
    for site in plan.sites:
        for factor in ("lokr_w1", "lokr_w1_a"):
            key = f"{prefix}{site.path}.{factor}"
            if key in tensors and site.options["scaling"] != 1:
                converted[key] = tensors[key] / site.options["scaling"]
    if any(converted[key] is not tensors[key] for key in tensors):
        warnings.warn(
            f"{directory / WEIGHTS_NAME}: LoKr adapter of a peft before 0.14 (its config has no rank_dropout_scale), "
            "whose update had no alpha / r factor: lokr_w1 is divided by alpha / r on load to keep its outputs "
            "(peft 0.22 scales it by alpha / r and gives other outputs)",
            UserWarning,
            stacklevel=2,
        )
    return converted
