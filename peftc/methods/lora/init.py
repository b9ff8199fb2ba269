"""LoRA initialisations that are more than "A random, B zero" (owned by the LoRA method).

Every function works on the weight in *row layout* (out, in): the Linear layout, which GPT-2's
Conv1D reaches by a transpose. The math and the order of random draws follow peft 0.22.0, so a
seeded run draws the same numbers peft draws.

- PiSSA: W = V S U^T; with the top-r triplets A = sqrt(S_r / s) U_r^T, B = V_r sqrt(S_r / s),
  so s B A is the principal rank-r part of W; the base keeps the residual W - s B A.
  `pissa_niter_K` uses the randomised `torch.svd_lowrank(W, r, niter=K)` instead of a full SVD.
- OLoRA: W = Q R (QR decomposition); B = Q[:, :r], A = R[:r]; the base keeps W - s B A.
- orthogonal: A and B are non-zero with B A = 0 exactly: with Q orthogonal (r x r),
  A = (G1 Q[0::2])^T / 10 and B = G2^T Q[1::2] / 10 (G random), and rows of Q are orthogonal.
- NoRA (peft 0.22): A as nn.Linear draws it, each column scaled to unit L2 norm (per expert block
  on a 3-D stack), B zero: a no-op that, trained, is a plain LoRA.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # used with fullmatch: "$" would pass a trailing newline
# Initialisations that rewrite the base weight (the adapter starts as part of W).
BASE_MUTATING = ("pissa", "olora")


def init_family(init: object) -> str:
    """'default' (true), 'none' (false), 'gaussian', 'pissa' (any pissa variant), 'olora', 'orthogonal'."""
    if init is True:
        return "default"
    if init is False:
        return "none"
    if init == "pissa" or (isinstance(init, str) and PISSA_NITER.fullmatch(init)):
        return "pissa"
    return str(init)


def is_valid_init(init: object) -> bool:
    return init in (True, False, "gaussian", "pissa", "olora", "orthogonal", "nora") or (
        isinstance(init, str) and PISSA_NITER.fullmatch(init) is not None
    )


def reset_default(lora_a: nn.Module, lora_b: nn.Module, init: object, r: int) -> None:
    """true: A Kaiming-uniform (nn.Linear's default), 'gaussian': A ~ N(0, 1/r), 'nora': A's
    construction draw normalised; B (and its bias) zero."""
    if init == "nora":
        nora_(lora_a, lora_b, r)
        return
    if init == "gaussian":
        nn.init.normal_(lora_a.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)
    if getattr(lora_b, "bias", None) is not None:
        nn.init.zeros_(lora_b.bias)


@torch.no_grad()
def nora_(lora_a: nn.Module, lora_b: nn.Module, r: int) -> None:
    """NoRA in place: A keeps its construction draw (no second draw, as peft), each column of every
    (r, in) block normalised (clamped at 1e-6); B and its bias zero."""
    blocks = lora_a.weight.view(-1, r, lora_a.weight.shape[-1])
    blocks.div_(blocks.norm(dim=1, keepdim=True).clamp_min(1e-6))
    nn.init.zeros_(lora_b.weight)
    if getattr(lora_b, "bias", None) is not None:
        nn.init.zeros_(lora_b.bias)


@torch.no_grad()
def pissa(rows: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the principal singular triplets of `rows` (float32, out x in)."""
    match = PISSA_NITER.fullmatch(init)
    if match is None:
        v, s, uh = torch.linalg.svd(rows, full_matrices=False)
        v_r, s_r, uh_r = v[:, :r], s[:r] / scaling, uh[:r]
    else:
        v_r, s_r, u_r = torch.svd_lowrank(rows, r, niter=int(match.group(1)))
        s_r, uh_r = s_r / scaling, u_r.t()
    root = torch.diag(torch.sqrt(s_r))
    return root @ uh_r, v_r @ root


@torch.no_grad()
def olora(rows: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the QR decomposition of `rows` (float32, out x in)."""
    q, upper = torch.linalg.qr(rows)
    return upper[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def orthogonal(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), both non-zero, with B A = 0 (r must be even)."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0
    lora_b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0
    return lora_a.contiguous(), lora_b.contiguous()
