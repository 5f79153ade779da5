"""The GMFlow policy pi-GM: a closed-form velocity field from one Gaussian-mixture prediction (PIFLOW.md §2.1-§2.6).

The student predicts, per sample and latent pixel, a K-component isotropic GM over the velocity u at
(x_src, sigma_src). Converted to x0 space it is the student's denoising posterior q(x0 | x_src); the policy's
velocity at a later (x_t, sigma_t <= sigma_src) is the posterior mean of x0 under the implied data distribution,
conditioned on x_t instead (Bayes with the likelihood ratio of §2.4), turned back into a velocity.
"""
from __future__ import annotations

import math

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Policy math runs in float32 (bf16/fp16 inputs are upcast); float64 inputs stay float64 (exact tests)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sigma_batch(sigma, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float, 0-d or (B,) sigma -> (B,) tensor of the policy's dtype."""
    # Python floats go straight to `dtype` (as_tensor alone would round them through float32 first).
    s = sigma.to(device=device, dtype=dtype) if torch.is_tensor(sigma) else torch.tensor(sigma, dtype=dtype, device=device)
    if s.dim() == 0:
        return s.expand(batch_size)
    s = s.reshape(-1)
    if s.numel() != batch_size:
        raise ValueError(f"sigma must be a scalar or have {batch_size} per-sample values, got {tuple(s.shape)}")
    return s


class GMPolicy:
    """pi-GM. All tensors are stored in the compute dtype (float32, or float64 when given float64).

    means (B, K, C, H, W) u-space component means m_k; logweights (B, K, 1, H, W) (log-softmax normalised over K
    here, shared by the C channels); logstd (B, 1, 1, 1, 1) one u-space log-std per sample; x_src (B, C, H, W);
    sigma_src (B,). eps: the lower clamp of sigma_src, sigma_t and 1 + v * zeta (LakonLab >= 0.1.0 form, §2.5).
    """

    def __init__(self, means, logweights, logstd, x_src, sigma_src, eps: float = 1e-6):
        if means.dim() != 5:
            raise ValueError(f"GMPolicy: means must be (B, K, C, H, W), got {tuple(means.shape)}")
        B, K, C, H, W = means.shape
        if tuple(logweights.shape) != (B, K, 1, H, W):
            raise ValueError(f"GMPolicy: logweights must be {(B, K, 1, H, W)}, got {tuple(logweights.shape)}")
        if logstd.numel() != B:
            raise ValueError(f"GMPolicy: logstd must hold one value per sample (B={B}), got {tuple(logstd.shape)}")
        if tuple(x_src.shape) != (B, C, H, W):
            raise ValueError(f"GMPolicy: x_src must be {(B, C, H, W)}, got {tuple(x_src.shape)}")
        dtype = compute_dtype(means, logweights, logstd, x_src)
        self.eps = eps
        self.means = means.to(dtype)  # (B, K, C, H, W) u-space
        self.logweights = torch.log_softmax(logweights.to(dtype), dim=1)  # (B, K, 1, H, W)
        self.logstd = logstd.to(dtype).reshape(B, 1, 1, 1, 1)
        self.x_src = x_src.to(dtype)  # (B, C, H, W)
        self.sigma_src = sigma_batch(sigma_src, B, dtype, means.device)  # (B,)
        # x0-space GM (§2.3): mu_k = x_src - sigma_src * m_k, shared variance v = exp(2 logstd) * sigma_src^2.
        sigma_src_c = self.sigma_src.clamp(min=eps).reshape(B, 1, 1, 1, 1)
        self._sigma_src_c = sigma_src_c
        self.mu = self.x_src.unsqueeze(1) - sigma_src_c * self.means  # (B, K, C, H, W)
        self.var = torch.exp(2 * self.logstd) * sigma_src_c**2  # (B, 1, 1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    def _replace(self, **kw) -> "GMPolicy":
        args = dict(means=self.means, logweights=self.logweights, logstd=self.logstd, x_src=self.x_src,
                    sigma_src=self.sigma_src, eps=self.eps)
        args.update(kw)
        return GMPolicy(**args)

    def detach(self) -> "GMPolicy":
        """A copy whose parameters carry no gradient (for rollouts that only produce teacher query states)."""
        return self._replace(means=self.means.detach(), logweights=self.logweights.detach(),
                             logstd=self.logstd.detach(), x_src=self.x_src.detach(),
                             sigma_src=self.sigma_src.detach())

    def with_temperature(self, temperature: float) -> "GMPolicy":
        """Sharpen the x0-space GM (§2.6): weights softmax(l / T), variance v * T. T >= 1 is a no-op.

        Means are unchanged (mu_k and m_k are the same components); v * T is logstd + 0.5 log T.
        """
        T = float(temperature)
        if not T > 0:
            raise ValueError(f"GMPolicy.with_temperature: T must be > 0, got {temperature}")
        if T >= 1:
            return self
        return self._replace(logweights=torch.log_softmax(self.logweights / T, dim=1),
                             logstd=self.logstd + 0.5 * math.log(T))

    def with_dropout(self, p: float, generator: torch.Generator | None = None) -> "GMPolicy":
        """Component dropout (§2.6): each (sample, component) is dropped with probability p (log-weight -inf,
        for all its pixels); a sample that would lose all K components keeps them all. p = 0 is a no-op."""
        if not 0 <= p < 1:
            raise ValueError(f"GMPolicy.with_dropout: p must be in [0, 1), got {p}")
        if p == 0:
            return self
        from models.sample_rng import uniform

        B, K = self.means.shape[:2]
        drop = uniform(generator, B, (K,), torch.float32, self.means.device) < p  # (B, K)
        drop &= ~drop.all(dim=1, keepdim=True)  # never remove every component of a sample
        logweights = self.logweights.masked_fill(drop.reshape(B, K, 1, 1, 1), float("-inf"))
        return self._replace(logweights=logweights)

    def mean_velocity(self) -> torch.Tensor:
        """sum_k w_k m_k (B, C, H, W): the policy's velocity at (x_src, sigma_src) (§8 property 1)."""
        return (self.logweights.exp() * self.means).sum(dim=1)

    def x0_gm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The x0-space GM: (mu (B,K,C,H,W), normalised log-weights (B,K,1,H,W), variance v (B,1,1,1,1))."""
        return self.mu, self.logweights, self.var

    def x0_posterior_mean(self, x_t: torch.Tensor, sigma_t) -> torch.Tensor:
        """E[x0 | x_t] under the implied data distribution (precision form of §2.4), (B, C, H, W).

        No shortcut branch for (x_t, sigma_t) == (x_src, sigma_src): the general formula returns the prior
        mean there (zeta = 0, nu = 0), and an equality test would cost a host sync per substep.
        """
        B = self.batch_size
        eps = self.eps
        x_t = x_t.to(self.dtype)  # (B, C, H, W)
        sigma_t = sigma_batch(sigma_t, B, self.dtype, x_t.device).clamp(min=eps).reshape(B, 1, 1, 1)
        sigma_s = self._sigma_src_c.reshape(B, 1, 1, 1)
        alpha_t, alpha_s = 1 - sigma_t, 1 - sigma_s
        # zeta per sample, reshaped to (B, 1, 1, 1, 1) so it broadcasts over the component axis too.
        zeta = ((alpha_t / sigma_t) ** 2 - (alpha_s / sigma_s) ** 2).reshape(B, 1, 1, 1, 1)
        nu = (alpha_t * x_t / sigma_t**2 - alpha_s * self.x_src / sigma_s**2).unsqueeze(1)  # (B, 1, C, H, W)
        denom = (1 + self.var * zeta).clamp(min=eps)  # (B, 1, 1, 1, 1)
        mu_post = (self.mu + self.var * nu) / denom  # (B, K, C, H, W)
        logits = self.logweights + (self.mu * (nu - 0.5 * zeta * self.mu)).sum(dim=2, keepdim=True) / denom
        weights = torch.softmax(logits, dim=1)  # (B, K, 1, H, W)
        return (weights * mu_post).sum(dim=1)

    def velocity(self, x_t: torch.Tensor, sigma_t) -> torch.Tensor:
        """pi(x_t, sigma_t) = (x_t - E[x0 | x_t]) / max(sigma_t, eps) for sigma_t <= sigma_src, (B, C, H, W)."""
        B = self.batch_size
        x_t = x_t.to(self.dtype)
        sigma = sigma_batch(sigma_t, B, self.dtype, x_t.device).clamp(min=self.eps).reshape(B, 1, 1, 1)
        return (x_t - self.x0_posterior_mean(x_t, sigma_t)) / sigma
