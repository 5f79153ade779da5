"""Euler rollout of a network-free policy, uniform in raw time tau (PIFLOW.md §3.2), and the window-averaged
velocity of a pi-ID prediction (§3.3).

A rollout from tau_start to tau_end takes n = max(1, round((tau_start - tau_end) * total_substeps)) substeps of
raw length h = (tau_start - tau_end) / n; each substep evaluates the policy at its start and moves
x <- x + u * (sigma' - sigma). Samples of one batch may have different spans (and so different n): the loop runs
to the largest n and freezes finished samples with a mask. Substep times are tau_start - i * h (not an
accumulated sum) and the last one is tau_end exactly, so the rollout ends on its target time.
"""
from __future__ import annotations

import torch

from models.timesteps import as_batch, num_substeps, warp


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    # The rollout state is float32 (float64 kept for exact tests), whatever the network's dtype.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rollout_to_points(policy, x: torch.Tensor, tau_start, tau_points: torch.Tensor, shift: float,
                      total_substeps: float = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll out through P successive per-sample raw times, recording the state at each.

    x (B, C, H, W); tau_start float or (B,); tau_points (P, B) non-increasing along P and <= tau_start.
    Piece p goes from tau_points[p-1] (tau_start for p = 0) to tau_points[p] with its own substep count, i.e.
    exactly what P successive `rollout` calls would do, but in one masked loop of max_b sum_p n_pb iterations.
    Returns (states (P, B, C, H, W), u_first (B, C, H, W) the velocity at (x, tau_start)).
    """
    B = x.shape[0]
    device = x.device
    x = x.to(_state_dtype(x))
    tau0 = as_batch(tau_start, B, device)  # (B,) float64
    tau_points = torch.as_tensor(tau_points, dtype=torch.float64, device=device).reshape(-1, B)  # (P, B)
    P = tau_points.shape[0]
    piece_start = torch.cat([tau0[None], tau_points[:-1]])  # (P, B)
    span = piece_start - tau_points  # (P, B)
    if bool((span < -1e-12).any()):
        raise ValueError("rollout: every target time must be <= the previous one (the policy integrates "
                         f"towards sigma = 0); got starts {piece_start.tolist()} and ends {tau_points.tolist()}")
    span = span.clamp(min=0)
    n = num_substeps(span, total_substeps)  # (P, B) int64
    h = span / n  # (P, B) float64
    cum = n.cumsum(0)  # (P, B)
    n_total = cum[-1]  # (B,)
    J = int(n_total.max())

    # Per-iteration schedule, all (J, B): which piece each sample is in, and the substep's start/end time.
    j = torch.arange(J, device=device)[:, None]  # (J, 1)
    piece = (cum[None] <= j[..., None]).sum(1).clamp(max=P - 1)  # (J, B)
    gather = lambda t: torch.gather(t, 0, piece)  # (P, B) -> (J, B)
    offset = (j - (gather(cum) - gather(n))).to(torch.float64)  # substep index inside its piece
    t_from = gather(piece_start) - offset * gather(h)
    is_last = (offset + 1) == gather(n).to(torch.float64)
    t_to = torch.where(is_last, gather(tau_points), gather(piece_start) - (offset + 1) * gather(h)).clamp(min=0)
    active = j < n_total[None]  # (J, B)
    # Finished samples sit still at their final time: a zero-length substep at a valid sigma (keeps the unused
    # velocity finite, so no inf * 0 can reach the gradients).
    t_from = torch.where(active, t_from, tau_points[-1][None])
    t_to = torch.where(active, t_to, tau_points[-1][None])
    sigma_from, sigma_to = warp(t_from, shift), warp(t_to, shift)

    states = x.new_zeros((P,) + tuple(x.shape))  # (P, B, C, H, W)
    batch = torch.arange(B, device=device)
    u_first = None
    for i in range(J):
        u = policy.velocity(x, sigma_from[i]).to(x.dtype)  # (B, C, H, W)
        if i == 0:
            u_first = u
        d_sigma = (sigma_to[i] - sigma_from[i]).to(x.dtype).reshape(B, 1, 1, 1)
        x = torch.where(active[i].reshape(B, 1, 1, 1), x + u * d_sigma, x)
        record = (active[i] & is_last[i]).reshape(B, 1, 1, 1)
        if P == 1:
            continue  # the final x is the only state asked for; frozen samples already hold it
        states[piece[i], batch] = torch.where(record, x, states[piece[i], batch])
    if P == 1:
        states = x.unsqueeze(0)
    return states, u_first


def rollout(policy, x: torch.Tensor, tau_start, tau_end, shift: float, total_substeps: float = 128) -> torch.Tensor:
    """Integrate `policy` from tau_start to tau_end (floats or per-sample (B,) tensors); returns x_end (B,C,H,W).

    Gradients flow through the policy parameters unless the caller passes a detached policy or uses no_grad.
    """
    B = x.shape[0]
    tau_end = as_batch(tau_end, B, x.device)[None]  # (1, B)
    states, _ = rollout_to_points(policy, x, tau_start, tau_end, shift, total_substeps)
    return states[0]


def window_average_velocity(policy, x_a: torch.Tensor, tau_a, tau_end, shift: float,
                            total_substeps: float = 128) -> torch.Tensor:
    """The student's prediction for one pi-ID pair (§3.3), (B, C, H, W).

    Per sample: if round((tau_a - tau_end) * total_substeps) < 2, the local velocity pi(x_a, sigma_a); else
    roll the (non-detached) policy from tau_a to tau_end and return (x_a - x_end) / max(sigma_a - sigma_end,
    1e-4), the average velocity over the window; gradients flow through the whole short rollout.
    """
    B = x_a.shape[0]
    tau_a = as_batch(tau_a, B, x_a.device)
    tau_end = as_batch(tau_end, B, x_a.device)
    local = torch.round((tau_a - tau_end) * total_substeps) < 2  # (B,)
    if bool(local.all()):
        return policy.velocity(x_a, warp(tau_a, shift)).to(_state_dtype(x_a))
    # Local samples get a one-point rollout to tau_a itself; their answer is u_first, the local velocity.
    tau_target = torch.where(local, tau_a, tau_end)
    states, u_first = rollout_to_points(policy, x_a, tau_a, tau_target[None], shift, total_substeps)
    x_a = x_a.to(u_first.dtype)
    d_sigma = (warp(tau_a, shift) - warp(tau_target, shift)).clamp(min=1e-4).to(x_a.dtype).reshape(B, 1, 1, 1)
    u_window = (x_a - states[0]) / d_sigma
    return torch.where(local.reshape(B, 1, 1, 1), u_first, u_window)
