"""One job: the best rank-r approximation of a weight delta (Eckart–Young: the truncated SVD),
by a fixed rank or by the share of the delta's energy (the sum of its squared singular values)
to keep, with the error it leaves. resize, merge --rank and extract share it.

A delta given as factors (up @ down, as a LoRA holds it) is decomposed without forming the
full matrix: QR of each factor, then the SVD of the small [R, R] core — the same singular
values at a fraction of the cost for a large layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ConfigError


@dataclass
class LowRank:
    """A rank-`rank` LoRA (scale 1: alpha = rank) for one delta, and how close it is."""
    down: torch.Tensor     # [r, in] (a conv: [r, in, k, k])
    up: torch.Tensor       # [out, r] (a conv: [out, r, 1, 1])
    rank: int
    kept_energy: float     # sum of the kept squared singular values / sum of all
    error: float           # ||dW - dW_r||_F / ||dW||_F (0 for a zero delta)
    norm: float            # ||dW||_F, to weigh the layer in an overall error

    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def abs_error(self) -> float:
        return self.error * self.norm


def check_target(rank: int | None, energy: float | None, flag: str = "") -> None:
    """Exactly one of rank (≥ 1) or energy (0 < e ≤ 1); ConfigError naming the flag."""
    if (rank is None) == (energy is None):
        raise ConfigError(f"{flag}give either --rank R or --energy F (the share of each "
                          "layer's energy to keep, 0 < F <= 1), not both or neither.")
    if rank is not None and rank < 1:
        raise ConfigError(f"{flag}--rank {rank}: the rank must be 1 or more.")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"{flag}--energy {energy}: give a share of the energy, "
                          "0 < F <= 1 (e.g. 0.9).")


def low_rank_of_delta(delta: torch.Tensor, *, rank: int | None = None,
                      energy: float | None = None, max_rank: int | None = None) -> LowRank:
    """The truncated SVD of a full delta ([out, in] or a conv's [out, in, k, k])."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _truncate(u, s, vh, delta.shape, rank, energy, max_rank)


def low_rank_of_factors(up: torch.Tensor, down: torch.Tensor, delta_shape: torch.Size, *,
                        rank: int | None = None, energy: float | None = None,
                        max_rank: int | None = None) -> LowRank:
    """The truncated SVD of up @ down (up [out, R], down [R, in…], scale already in up)."""
    up2, down2 = up.float().flatten(1), down.float().flatten(1)
    q_up, r_up = torch.linalg.qr(up2)             # up = Qu Ru
    q_down, r_down = torch.linalg.qr(down2.T)     # down = Rd^T Qd^T
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return _truncate(q_up @ u, s, vh @ q_down.T, delta_shape, rank, energy, max_rank)


def _truncate(u, s, vh, shape, rank, energy, max_rank) -> LowRank:
    squares = s.double() ** 2
    total = float(squares.sum())
    available = s.numel() if max_rank is None else max(1, min(s.numel(), max_rank))
    if rank is not None:
        r = min(rank, available)
    else:
        if total == 0.0:
            r = 1
        else:
            shares = torch.cumsum(squares, 0) / total
            # the smallest rank whose share reaches the target (float rounding allowed for)
            r = int((shares < energy - 1e-12).sum().item()) + 1
        r = min(max(r, 1), available)
    kept = float(squares[:r].sum())
    error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    root = s[:r].sqrt()  # split evenly between the factors: neither holds the whole range
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    return LowRank(down.contiguous(), up.contiguous(), r,
                   kept / total if total > 0 else 1.0, error, total ** 0.5)


def overall_error(parts: list[LowRank]) -> float:
    """The relative Frobenius error of all layers together (each layer weighed by its size)."""
    total = sum(p.norm ** 2 for p in parts)
    return (sum(p.abs_error ** 2 for p in parts) / total) ** 0.5 if total > 0 else 0.0


def require_finite(delta: torch.Tensor, name: str) -> None:
    if not torch.isfinite(delta).all():
        raise ConfigError(f"layer {name} holds NaN or infinite values.")
