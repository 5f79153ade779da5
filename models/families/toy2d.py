"""The 2-D toy of issue 2: data, metrics, the MLP flow-matching teacher and its policy students.

Data: a mixture of `NUM_MODES` isotropic Gaussians on a circle, of unequal weight. Tensors follow the image
layout of the policies with C = 2, H = W = 1: a batch of points is (B, 2, 1, 1), so GMPolicy / DXPolicy and
the rollout run unchanged.

Metrics (float64): energy distance (V-statistic), per-sample mode assignment, off-mode fraction (farther
than `n_std` std from every centre), modes covered, mode-weight error (total variation between on-mode
fractions).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from models.families.base import Family
from models.types import Cond, Config
from models.heads import DXHead, GMHead

NUM_MODES = 8
MODE_RADIUS = 2.0
MODE_STD = 0.1
# A string that changes whenever the data above or the network layout below changes; the teacher cache key
# includes it so a cached teacher is never reused for a different problem.
DATA_VERSION = f"toy2d-v1:modes={NUM_MODES}:r={MODE_RADIUS}:std={MODE_STD}:w=linspace(1,3)"


# ------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ToyMixture:
    centres: torch.Tensor  # (M, 2) float64
    weights: torch.Tensor  # (M,) float64, sums to 1
    std: float

    @classmethod
    def default(cls) -> "ToyMixture":
        angles = torch.arange(NUM_MODES, dtype=torch.float64) * (2 * math.pi / NUM_MODES)
        centres = MODE_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
        weights = torch.linspace(1.0, 3.0, NUM_MODES, dtype=torch.float64)  # unequal: 1 : 3 smallest : largest
        return cls(centres, weights / weights.sum(), MODE_STD)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points (n, 2) float32."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centres[idx] + self.std * noise).float()


def to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) -> (B, 2, 1, 1), the layout of the policies."""
    return x.reshape(x.shape[0], 2, 1, 1)


def to_points(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, 1, 1) or (B, 2) -> (B, 2)."""
    return x.reshape(x.shape[0], 2)


# ---------------------------------------------------------------------------------------------- metrics
def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        # exact differences (the matmul shortcut loses ~1e-10 relative, visible on near-identical sets)
        total += torch.cdist(a[i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist").sum().item()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| as a V-statistic (all pairs, the diagonal
    included), in float64. Exactly 0 for identical sets; for two independent sets from one distribution its
    expectation is about (E|X-X'|)(1/n + 1/m) > 0, which is why a noise floor is reported beside it."""
    x = to_points(x).double()
    y = to_points(y).double()
    return 2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)


def assign_modes(samples: torch.Tensor, centres: torch.Tensor, std: float, n_std: float = 4.0) -> torch.Tensor:
    """Index of the nearest centre for each sample, or -1 when it is farther than n_std * std from all. (B,)"""
    d = torch.cdist(to_points(samples).double(), centres.double())  # (B, M)
    dist, idx = d.min(dim=1)
    return torch.where(dist <= n_std * std, idx, torch.full_like(idx, -1))


def mode_fractions(assign: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Fraction of the ON-mode samples in each mode (M,), float64; zeros if no sample is on a mode."""
    on = assign[assign >= 0]
    counts = torch.bincount(on, minlength=num_modes).double()
    return counts / max(on.numel(), 1)


def off_mode_fraction(assign: torch.Tensor) -> float:
    return float((assign < 0).double().mean())


def modes_covered(fractions: torch.Tensor, ref_fractions: torch.Tensor, rel: float = 0.2) -> int:
    """Modes holding at least `rel` times the reference set's fraction of on-mode samples."""
    return int(((fractions >= rel * ref_fractions) & (fractions > 0)).sum())


def mode_weight_error(fractions: torch.Tensor, ref_fractions: torch.Tensor) -> float:
    """Total-variation distance between two vectors of mode fractions."""
    return 0.5 * float((fractions - ref_fractions).abs().sum())


def distribution_metrics(samples: torch.Tensor, reference: torch.Tensor, mixture: ToyMixture) -> dict[str, float]:
    """All toy metrics of `samples` against a `reference` (teacher) set."""
    m = mixture.centres.shape[0]
    a = assign_modes(samples, mixture.centres, mixture.std)
    a_ref = assign_modes(reference, mixture.centres, mixture.std)
    frac, frac_ref = mode_fractions(a, m), mode_fractions(a_ref, m)
    return {
        "ed": energy_distance(samples, reference),
        "modes_covered": modes_covered(frac, frac_ref),
        "off_mode": off_mode_fraction(a),
        "mode_weight_error": mode_weight_error(frac, frac_ref),
    }


# ------------------------------------------------------------------------------------------------ networks
def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of sigma in [0, 1] (B,) -> (B, dim), frequencies 1..1000 (log-spaced) like t = 1000 sigma."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=sigma.device))
    arg = sigma.float()[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class ToyTrunk(nn.Module):
    """(x (B, 2), sigma (B,)) -> hidden (B, D), temb (B, D). The conditioning embedding is added at every layer."""

    def __init__(self, hidden_dim: int = 256, num_layers: int = 4, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.in_proj = nn.Linear(2, hidden_dim)
        self.layers = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embed(sigma_embedding(sigma, self.emb_dim))  # (B, D)
        h = self.in_proj(x)
        for layer in self.layers:
            h = nn.functional.silu(layer(h + temb))
        return h, temb


class ToyVelocityNet(nn.Module):
    """Flow-matching velocity u(x, sigma) = eps - x0 for 2-D points; x (B, 2) or (B, 2, 1, 1)."""

    def __init__(self, hidden_dim: int = 256, num_layers: int = 4):
        super().__init__()
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.trunk = ToyTrunk(hidden_dim, num_layers)
        self.proj_out = nn.Linear(hidden_dim, 2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h, _ = self.trunk(to_points(x), sigma)
        return self.proj_out(h).reshape(x.shape)


def flow_matching_loss(net: ToyVelocityNet, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Teacher objective: sigma ~ U(0, 1) (shift 1), x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0."""
    sigma = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    return ((net(x_t, sigma) - (eps - x0)) ** 2).mean()


@torch.no_grad()
def euler_sample(teacher, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Teacher sampling with `steps` uniform Euler steps from sigma = 1 to 0 (shift 1). noise (B, 2, 1, 1)."""
    x = noise.float()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + teacher(x, s.expand(x.shape[0]), None) * (s_next - s)
    return x


# ------------------------------------------------------------------------------------------------ students
class ToyGMStudent(nn.Module):
    """The teacher's trunk + a K-component GM head initialised from the teacher's last linear (§2.2)."""

    def __init__(self, teacher: ToyVelocityNet, num_components: int = 8, bias_noise: float = 0.05,
                 logstd_inner_dim: int = 1024, init_logstd: float = math.log(0.05),
                 generator: torch.Generator | None = None):
        super().__init__()
        self.trunk = copy.deepcopy(teacher.trunk).requires_grad_(True)
        self.head = GMHead.from_teacher_proj(
            teacher.proj_out, num_components, patch_pixels=1, cond_dim=teacher.hidden_dim,
            channel_index=torch.arange(2), bias_noise=bias_noise, logstd_inner_dim=logstd_inner_dim,
            init_logstd=init_logstd, generator=generator,
        )

    def forward(self, x_src: torch.Tensor, sigma_src: torch.Tensor):
        """x_src (B, 2, 1, 1), sigma_src (B,) -> means (B, K, 2, 1, 1), logweights (B, K, 1, 1, 1), logstd (B, 1, 1, 1, 1)."""
        B = x_src.shape[0]
        hidden, temb = self.trunk(to_points(x_src), sigma_src)
        means, logweights, logstd = self.head(hidden[:, None], temb)  # (B,1,K,2), (B,1,K,1), (B,)
        K = means.shape[2]
        return (means.reshape(B, K, 2, 1, 1).float(), logweights.reshape(B, K, 1, 1, 1).float(),
                logstd.reshape(B, 1, 1, 1, 1).float())

    def make_policy(self, x_src: torch.Tensor, sigma_src: torch.Tensor, cond=None):
        from models.policies import GMPolicy

        means, logweights, logstd = self(x_src, sigma_src)
        return GMPolicy(means, logweights, logstd, x_src.float(), sigma_src.float())


class ToyDXStudent(nn.Module):
    """The teacher's trunk + a DX head with N grid points (§2.7); `segment` and `shift` are its intrinsic
    parameters (fixed by the training schedule)."""

    def __init__(self, teacher: ToyVelocityNet, num_grid: int, segment: float, shift: float, mode: str = "grid"):
        super().__init__()
        self.trunk = copy.deepcopy(teacher.trunk).requires_grad_(True)
        self.head = DXHead.from_teacher_proj(teacher.proj_out, num_grid, mode)
        self.segment, self.shift, self.mode = segment, shift, mode

    def forward(self, x_src: torch.Tensor, sigma_src: torch.Tensor) -> torch.Tensor:
        """-> x0 values (B, N, 2, 1, 1): grid points or polynomial coefficients (models.policies.dx_x0_from_u)."""
        from models.policies import dx_x0_from_u

        B = x_src.shape[0]
        hidden, _ = self.trunk(to_points(x_src), sigma_src)
        out = self.head(hidden[:, None]).reshape(B, -1, 2, 1, 1).float()  # u-space (B, N, 2, 1, 1)
        return dx_x0_from_u(out, x_src.float(), sigma_src.float(), self.mode)

    def make_policy(self, x_src: torch.Tensor, sigma_src: torch.Tensor, cond=None):
        from models.policies import DXPolicy

        return DXPolicy(self(x_src, sigma_src), x_src.float(), sigma_src.float(), self.segment, self.shift,
                        mode=self.mode)


class ToyShortcutStudent(nn.Module):
    """Baseline of the format pi-Flow replaces: the same network maps noise to the teacher's ODE endpoint in
    one step, x0 = z - u(z, 1), trained by regression on (noise, 256-step endpoint) pairs."""

    def __init__(self, teacher: ToyVelocityNet):
        super().__init__()
        self.net = copy.deepcopy(teacher).requires_grad_(True)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(noise.shape[0])
        return noise - self.net(noise, ones)


# ------------------------------------------------------------------------------------------------ family
class Toy2DFamily(Family):
    """The toy as a model family. Its teacher network is trained and cached by the trainer
    (`trainer.teachers.build.load_teacher`) and handed in here; models/ does not train or locate it."""

    name = "toy2d"

    def latent_shape(self, cfg: Config) -> tuple[int, int, int]:
        return (2, 1, 1)

    def build_teacher(self, cfg: Config, network: ToyVelocityNet | None = None):
        """The frozen teacher around `network`, or around the safetensors file named by model.pretrained
        (the path `trainer.teachers.build.ensure_teacher` returns)."""
        from models.teacher import Teacher

        if network is None:
            if not cfg.model.pretrained:
                raise ValueError("toy2d: build_teacher needs the trained network or model.pretrained = the cached "
                                 "teacher file (trainer.teachers.build.build_teacher(cfg, family) does both)")
            from safetensors.torch import load_file

            network = ToyVelocityNet(cfg.model.hidden_dim, cfg.model.num_layers)
            try:
                network.load_state_dict(load_file(cfg.model.pretrained))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"model.pretrained: {cfg.model.pretrained!r} is not a toy2d teacher of "
                                 f"hidden_dim={cfg.model.hidden_dim}, num_layers={cfg.model.num_layers} ({e})") from e
        return Teacher(self, cfg, network)

    def build_student(self, cfg: Config, teacher=None, generator: torch.Generator | None = None):
        """GM (K components, §2.2 init) or DX (N grid points) student on a copy of the teacher's trunk."""
        if teacher is None:
            raise ValueError("toy2d: build_student needs the teacher (its trunk and last linear initialise the student)")
        network = teacher.network if hasattr(teacher, "network") else teacher
        p = cfg.policy
        if p.type == "gm":
            return ToyGMStudent(network, p.num_components, p.init_bias_noise, p.logstd_inner_dim, p.init_logstd,
                                generator=generator)
        if p.type == "dx":
            d = cfg.distill
            segment = p.dx_segment_size or 1.0 / (d.nfe - 1 + d.final_step_scale)
            return ToyDXStudent(network, p.num_grid, segment, d.shift, p.dx_mode)
        raise ValueError(f"policy.type: expected 'gm' or 'dx', got {p.type!r}")

    def teacher_velocity(self, cfg: Config, network: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                         cond: Cond | None) -> torch.Tensor:
        return network(x_t.float(), sigma.float()).float()
