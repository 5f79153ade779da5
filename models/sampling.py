"""Few-step sampling with a pi-Flow student and the FlowMapSDE schedule (PIFLOW.md §4.1).

Each step runs the student once at (x, sigma_k), builds its policy, rolls the policy out to sigma_dst and (when
h > 0) re-noises to sigma_{k+1}. With h = 0 (the default of every release) it is a deterministic ODE: sigma_dst
= sigma_{k+1} and the re-noising step is the identity.
"""
from __future__ import annotations

import torch

from models.policies.gm import GMPolicy
from models.rollout import rollout
from models.timesteps import as_batch, step_grid, unwarp


def auto_temperature(nfe: int) -> float:
    """The 'auto' GM temperature: clip(0.1 * (NFE - 1), 0, 1): 0.3 at 4 NFE, 0.7 at 8, 1 (off) from 11."""
    return min(max(0.1 * (nfe - 1), 0.0), 1.0)


def _renoise_factor(sigma_src, sigma_to, h: float):
    """m = (sigma_to * alpha_src / (sigma_src * alpha_to)) ** (h^2); h = 0 -> 1, h = inf -> 0."""
    if h == 0:
        return torch.ones_like(torch.as_tensor(sigma_to, dtype=torch.float64))
    if h == float("inf"):
        return torch.zeros_like(torch.as_tensor(sigma_to, dtype=torch.float64))
    sigma_src = torch.as_tensor(sigma_src, dtype=torch.float64)
    sigma_to = torch.as_tensor(sigma_to, dtype=torch.float64)
    ratio = sigma_to * (1 - sigma_src) / (sigma_src * (1 - sigma_to))
    return ratio.clamp(min=0) ** (h * h)


def flow_map_sigma_dst(sigma_src, sigma_to, h: float) -> torch.Tensor:
    """Where the policy must land before re-noising: sigma_dst = sigma_to m / (alpha_to + sigma_to m), float64."""
    if h < 0:
        raise ValueError(f"diffusion coefficient h must be >= 0, got {h}")
    sigma_to = torch.as_tensor(sigma_to, dtype=torch.float64)
    m = _renoise_factor(sigma_src, sigma_to, h)
    return sigma_to * m / ((1 - sigma_to) + sigma_to * m)


def flow_map_sde_step(x_dst: torch.Tensor, sigma_src, sigma_to, h: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-noise x_dst (at sigma_dst) to a sample at sigma_to: x_to = (alpha_to + sigma_to m) x_dst
    + sigma_to sqrt(1 - m^2) z. Identity for h = 0. sigma_src, sigma_to: floats or (B,)."""
    if h < 0:
        raise ValueError(f"diffusion coefficient h must be >= 0, got {h}")
    if h == 0:
        return x_dst
    B = x_dst.shape[0]
    sigma_src = as_batch(sigma_src, B, x_dst.device)
    sigma_to = as_batch(sigma_to, B, x_dst.device)
    m = _renoise_factor(sigma_src, sigma_to, h)
    scale = ((1 - sigma_to) + sigma_to * m).to(x_dst.dtype).reshape(B, 1, 1, 1)
    noise_std = (sigma_to * torch.sqrt((1 - m * m).clamp(min=0))).to(x_dst.dtype).reshape(B, 1, 1, 1)
    gen_device = generator.device if generator is not None else x_dst.device
    z = torch.randn(x_dst.shape, generator=generator, device=gen_device, dtype=x_dst.dtype).to(x_dst.device)
    return scale * x_dst + noise_std * z


@torch.no_grad()
def sample(make_policy, noise: torch.Tensor, nfe: int, final_step_scale: float, shift: float,
           total_substeps: float = 128, temperature="auto", h: float = 0.0,
           generator: torch.Generator | None = None, return_trajectory: bool = False):
    """Generate x0 from noise (B, C, H, W) in nfe student evaluations.

    make_policy(x (B,C,H,W), sigma (B,)) -> GMPolicy | DXPolicy runs the student once. A GM temperature ('auto'
    or a float; < 1 sharpens) is applied on every step except the last. Returns x0 (float32), or
    (x0, [x at each grid sigma, nfe + 1 states]) with return_trajectory.
    """
    T = auto_temperature(nfe) if temperature == "auto" else float(temperature)
    taus, sigmas = step_grid(nfe, final_step_scale, shift)
    B = noise.shape[0]
    x = noise.to(torch.float64 if noise.dtype == torch.float64 else torch.float32)
    trajectory = [x]
    for k in range(nfe):
        sigma_k = float(sigmas[k])
        policy = make_policy(x, torch.full((B,), sigma_k, dtype=x.dtype, device=x.device))
        if isinstance(policy, GMPolicy) and k < nfe - 1 and T < 1:
            policy = policy.with_temperature(T)
        sigma_to = float(sigmas[k + 1])
        tau_dst = unwarp(flow_map_sigma_dst(sigma_k, sigma_to, h), shift)
        x_dst = rollout(policy, x, float(taus[k]), float(tau_dst), shift, total_substeps)
        x = flow_map_sde_step(x_dst, sigma_k, sigma_to, h, generator)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
