"""DoRA (weight-decomposed LoRA) math, owned by the LoRA method.

The adapted weight is W' = m * (W + s B A) / ||W + s B A||, with the norm taken per output row
(per output channel for convolutions) and m a trainable magnitude vector, initialised to that
norm so an untrained adapter is a no-op. As in the paper (section 4.3) and peft, the norm is
detached: it follows the update but gets no gradient, and it is computed from the factors
without forming B A (`factored_row_norm`). The forward pass reuses the base output:
    y = base(x) + (m/n - 1) * (W x) + (m/n) * s * B A x,     n = ||W + s B A||.detach()
(for embeddings, whose "rows" are embedding dimensions, y = (m/n) * (base(x) + s * lookup(A) B^T)).
Merging folds the rescaling into the weight: W' = (m/n) (W + dW); the norm n is kept so that
unmerging, W = W' / (m/n) - dW, is exact up to float round-off.

All functions take weights in *row layout*: (out, in) for Linear (GPT-2's Conv1D and embeddings
are transposed into it), (out, in, k...) for convolutions.
"""

from __future__ import annotations

import torch


def row_norm(rows: torch.Tensor) -> torch.Tensor:
    """||row||_2 for every output row (all dims but the first), shape (out,)."""
    return torch.linalg.vector_norm(rows, dim=tuple(range(1, rows.dim())))


def magnitude_shape(kind: str, out_features: int) -> tuple[int, ...]:
    """peft's shape of `lora_magnitude_vector`: (out,), or (1, out, 1, ...) for ConvNd."""
    if kind.startswith("conv") and kind != "conv1d_hf":
        dims = int(kind[4])
        return (1, out_features, *([1] * dims))
    return (out_features,)


def initial_magnitude(rows: torch.Tensor, lora_rows: torch.Tensor, scaling: float, kind: str) -> torch.Tensor:
    """m = ||W + s B A|| per row, in peft's shape for this layer kind."""
    norm = row_norm(rows + scaling * lora_rows)
    return norm.reshape(magnitude_shape(kind, norm.numel()))


@torch.no_grad()
def factored_row_norm(rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per row without the out x in sum, from
        ||W_i + s (B A)_i||^2 = ||W_i||^2 + s <B_i, 2 (W A^T)_i + s (B A A^T)_i>:
    one GEMM reading W (out x r out) and one norm over it, where forming the sum writes and
    reads three weight-sized tensors. `rows` (out, ...) in row layout, A (r, in...) and B (out, r)
    as 2-D factors. Summed in float32; returned in the dtype W + s B A would have."""
    flat = rows.reshape(rows.shape[0], -1)
    projected = (flat @ lora_a.to(flat.dtype).T).float()  # W A^T, in W's dtype as autocast would
    a, b = lora_a.float(), lora_b.float()
    inner = torch.addmm(projected, b, a @ a.T, beta=2, alpha=scaling)  # 2 W A^T + s B A A^T
    squared = torch.linalg.vector_norm(flat, dim=1).float().square_()
    squared.add_((b * inner).sum(dim=1), alpha=scaling)
    return squared.clamp_min_(0).sqrt_().to(torch.promote_types(rows.dtype, lora_b.dtype))


def output_delta(
    mag_scale: torch.Tensor,
    base_out: torch.Tensor,
    lora_out: torch.Tensor,
    scaling: float,
    channel_dim: int,
) -> torch.Tensor:
    """(m/n - 1) * W x + (m/n) * s * B A x, broadcasting m/n along `channel_dim` of the output."""
    shape = [1] * base_out.dim()
    shape[channel_dim] = -1
    factor = mag_scale.view(shape)
    return (factor - 1) * base_out + factor * lora_out * scaling


def merged_rows(rows: torch.Tensor, delta_rows: torch.Tensor, mag_scale: torch.Tensor) -> torch.Tensor:
    """(m/n) * (W + dW), rows scaled by m/n."""
    return _per_row(mag_scale, rows) * (rows + delta_rows)


def unmerged_rows(rows: torch.Tensor, delta_rows: torch.Tensor, mag_scale: torch.Tensor) -> torch.Tensor:
    """W' / (m/n) - dW, the inverse of `merged_rows` for the same m/n."""
    return rows / _per_row(mag_scale, rows) - delta_rows


def _per_row(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vector.reshape(-1, *([1] * (like.dim() - 1)))
