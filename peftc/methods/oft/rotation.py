"""OFT's orthogonal blocks from their trainable entries: the skew-symmetric Q, its Cayley
transform (exact, or peft's truncated Cayley-Neumann series) and COFT's projection."""

from __future__ import annotations

import torch


def skew(vector: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, size(size-1)/2) upper-triangle entries -> (rows, size, size) skew-symmetric Q."""
    rows, cols = _upper_triangle(size, vector.device)
    matrix = torch.zeros(vector.shape[0], size, size, device=vector.device, dtype=vector.dtype)
    matrix[:, rows, cols] = vector
    return matrix - matrix.transpose(-2, -1)


_TRIANGLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """Row and column indices of a size x size matrix's strict upper triangle, made once per size
    and device instead of per layer and step (each is an operator: a kernel launch on a GPU).
    Traced code makes them afresh: compiled, they are constants of the graph."""
    if torch.compiler.is_compiling():
        return torch.triu_indices(size, size, 1, device=device)
    key = (size, device)
    if key not in _TRIANGLES:
        _TRIANGLES[key] = torch.triu_indices(size, size, 1, device=device)
    return _TRIANGLES[key]


def cayley(vector: torch.Tensor, size: int, neumann: bool, terms: int) -> torch.Tensor:
    """The orthogonal blocks R from the Q entries (see the module docstring for the series).
    The series is summed in place with `alpha`, one operator per term (as peft sums it)."""
    q = skew(vector, size)
    eye = torch.eye(size, device=q.device, dtype=q.dtype)
    if not neumann:
        eye = eye.expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rotation = eye.repeat(q.shape[0], 1, 1)
    if terms > 1:
        rotation.add_(q, alpha=2.0)
    if terms > 2:
        power = torch.bmm(q, q)
        rotation.add_(power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            rotation.add_(power, alpha=2.0)
        rotation.add_(torch.bmm(power, q))
    return rotation


@torch.no_grad()
def project_(weight: torch.Tensor, size: int, eps: float) -> None:
    """COFT: scale each block's Q down to Frobenius norm eps / sqrt(rows) when it is larger."""
    radius = eps / float(torch.sqrt(torch.tensor(float(weight.shape[0]))))
    q = skew(weight, size)
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    rows, cols = torch.triu_indices(size, size, 1, device=weight.device)
    weight.copy_(projected[:, rows, cols])
