"""`piflow convert dit-fm`: a synthetic state dict in the reference FM-DiT key layout, converted and loaded by the
dit family, gives the velocity of a direct implementation of the reference forward written here from the spec
(original DiT sincos tables, sinusoid with downscale_freq_shift 0, one shared time + class embedding,
adaLN-Zero blocks) to 1e-5; epsilon-prediction checkpoints and pickled objects are refused with one line."""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.cli import main
from models.families import get_family
from trainer.config import config_from_dict

C, P, D, HEADS, LAYERS, CLASSES, S = 4, 2, 32, 2, 2, 1000, 8


def reference_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the reference names and shapes (pos_embed.pos_embed stored, as older saves did)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    sd = {"pos_embed.proj.weight": w(D, C, P, P, std=0.2), "pos_embed.proj.bias": w(D),
          "pos_embed.pos_embed": sincos_table(D, S // P).float().unsqueeze(0),
          "emb.timestep_embedder.linear_1.weight": w(D, 256), "emb.timestep_embedder.linear_1.bias": w(D),
          "emb.timestep_embedder.linear_2.weight": w(D, D), "emb.timestep_embedder.linear_2.bias": w(D),
          "emb.class_embedder.embedding_table.weight": w(CLASSES + 1, D, std=0.5),
          "proj_out_1.weight": w(2 * D, D), "proj_out_1.bias": w(2 * D),
          "proj_out_2.weight": w(P * P * C, D, std=0.2), "proj_out_2.bias": w(P * P * C)}
    for i in range(LAYERS):
        b = f"transformer_blocks.{i}."
        sd.update({b + "norm1.linear.weight": w(6 * D, D), b + "norm1.linear.bias": w(6 * D, std=0.2),
                   b + "ff.net.0.proj.weight": w(4 * D, D), b + "ff.net.0.proj.bias": w(4 * D),
                   b + "ff.net.2.weight": w(D, 4 * D), b + "ff.net.2.bias": w(D)})
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            sd.update({f"{b}attn1.{name}.weight": w(D, D, std=0.2), f"{b}attn1.{name}.bias": w(D)})
    return sd


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """The original DiT's 2-D table: token (i, j) in row-major order; first half from the column j, second from i."""
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def timestep_embedding(t: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - shift))
    args = t.double()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def reference_forward(sd, x, t, y, freq_shift: float = 0.0) -> torch.Tensor:
    """The reference FM-DiT forward in float64, from the spec."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    ln = lambda h, eps: F.layer_norm(h, h.shape[-1:], eps=eps)  # noqa: E731
    B, _, H, W = x.shape
    h, w = H // P, W // P
    tokens = F.conv2d(x.double(), sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"], stride=P)
    tokens = tokens.flatten(2).transpose(1, 2) + sincos_table(D, h)  # (B, T, D)
    c = lin(F.silu(lin(timestep_embedding(t, freq_shift), "emb.timestep_embedder.linear_1")),
            "emb.timestep_embedder.linear_2") + sd["emb.class_embedder.embedding_table.weight"][y]
    hd = D // HEADS
    for i in range(LAYERS):
        b = f"transformer_blocks.{i}."
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = lin(F.silu(c), b + "norm1.linear").chunk(6, dim=1)
        a = ln(tokens, 1e-6) * (1 + sc_a[:, None]) + sh_a[:, None]
        q, k, v = (lin(a, f"{b}attn1.{n}").view(B, -1, HEADS, hd).transpose(1, 2) for n in ("to_q", "to_k", "to_v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        tokens = tokens + g_a[:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn1.to_out.0")
        m = ln(tokens, 1e-5) * (1 + sc_m[:, None]) + sh_m[:, None]
        tokens = tokens + g_m[:, None] * lin(F.gelu(lin(m, b + "ff.net.0.proj"), approximate="tanh"), b + "ff.net.2")
    shift, scale = lin(F.silu(c), "proj_out_1").chunk(2, dim=1)
    out = lin(ln(tokens, 1e-6) * (1 + scale[:, None]) + shift[:, None], "proj_out_2")  # (B, T, p*p*C)
    return out.view(B, h, w, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def dit_cfg(root):
    return config_from_dict({"model": {"family": "dit", "pretrained": str(root), "latent_channels": C,
                                       "latent_size": S, "num_timesteps": 1000.0},
                             "teacher": {"guidance": {"mode": "cfg", "scale": 2.7, "interval": [0.0, 0.6]}}})


def test_converted_reference_checkpoint_gives_the_reference_velocity(tmp_path):
    sd = reference_layout()
    decoy = {k: v + 1.0 for k, v in sd.items()}  # the non-EMA weights of a training checkpoint
    wrapped = {"state_dict": {**{"diffusion_ema.denoising." + k: v for k, v in sd.items()},
                              **{"diffusion.denoising." + k: v for k, v in decoy.items()}}}
    torch.save(wrapped, tmp_path / "flowdit.pth")
    out = tmp_path / "converted"
    assert main(["convert", "dit-fm", str(tmp_path / "flowdit.pth"), "--out", str(out), "--num-heads", "2"]) == 0
    assert (out / "scheduler" / "scheduler_config.json").exists()

    teacher = get_family("dit").build_teacher(dit_cfg(out))
    assert type(teacher.network).__name__ == "FlowDiTTransformer2DModel"
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(3, C, S, S, generator=g), torch.tensor([0.95, 0.5, 0.1])
    y = torch.tensor([207, 3, CLASSES])  # the null class row too
    u = teacher.unguided(x, sigma, {"class_labels": y})
    ref = reference_forward(sd, x, sigma * 1000, y)
    assert ref.abs().max() > 0.1
    assert (u.double() - ref).abs().max() < 1e-5, (u.double() - ref).abs().max()
    # the spec's details matter: diffusers' DiT sinusoid (shift 1) gives another field
    assert (reference_forward(sd, x, sigma * 1000, y, freq_shift=1.0) - ref).abs().max() > 1e-3
    # guided teacher: CFG against the null class inside the interval, exactly as the reference forward
    guided = teacher(x, sigma, {"class_labels": y})
    ref_neg = reference_forward(sd, x, sigma * 1000, torch.full_like(y, CLASSES))
    assert (guided[2].double() - (ref_neg[2] + 2.7 * (ref[2] - ref_neg[2]))).abs().max() < 1e-4
    assert torch.allclose(guided[0], u[0], atol=1e-5)  # sigma 0.95 is outside [0, 0.6]


def test_the_planner_counts_the_fm_dit_xl2():
    from trainer.config import load_config
    from trainer.planner.memory import count_model

    counts = count_model(load_config(Path(__file__).resolve().parents[2] / "configs" / "dit_imagenet_gm_k32_1nfe.yaml"))
    d, L = 1152, 28
    block = 6 * d * d + 6 * d + 4 * (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    root = (4 * 4 * d + d) + (256 * d + d) + (d * d + d) + 1001 * d + (2 * d * d + 2 * d) + (4 * 4 * d + 16)
    assert counts.total == L * block + root  # one shared embedding: 674.8M (28 per-block copies would add 75M)


def run_convert(tmp_path, sd_or_obj, name="ckpt.pth", extra=()):
    path = tmp_path / name
    torch.save(sd_or_obj, path)
    return main(["convert", "dit-fm", str(path), "--out", str(tmp_path / f"out_{name}"), "--num-heads", "2", *extra])


def test_epsilon_checkpoints_pickles_and_mismatches_are_refused_with_one_line(tmp_path, capsys):
    sd = reference_layout()
    cases = {
        "original DDPM DiT layout": {"x_embedder.proj.weight": torch.zeros(D, C, P, P),
                                     "t_embedder.mlp.0.weight": torch.zeros(D, 256),
                                     "final_layer.linear.weight": torch.zeros(P * P * 2 * C, D)},
        "learned-sigma DDPM DiT": {**sd, "proj_out_2.weight": torch.zeros(P * P * 2 * C, D),
                                   "proj_out_2.bias": torch.zeros(P * P * 2 * C)},
        "without pickle": {"state_dict": sd, "args": argparse.Namespace(lr=1e-4)},
        "missing \\['transformer_blocks.1.ff.net.2.bias'\\]": {k: v for k, v in sd.items()
                                                               if k != "transformer_blocks.1.ff.net.2.bias"},
        "not the 2-D sincos table": {**sd, "pos_embed.pos_embed": sd["pos_embed.pos_embed"] + 0.1},
    }
    for i, (message, obj) in enumerate(cases.items()):
        assert run_convert(tmp_path, obj, f"case{i}.pth") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"case{i}.pth" in err, err
        assert re.search(message, err), err
        assert not (tmp_path / f"out_case{i}.pth" / "transformer").exists()  # nothing written
    assert run_convert(tmp_path, {"state_dict": sd}, "ok.pth") == 0
    assert run_convert(tmp_path, {"state_dict": sd}, "ok.pth") == 2  # an existing conversion needs --force
    assert "--force" in capsys.readouterr().err
    assert run_convert(tmp_path, {"state_dict": sd}, "ok.pth", ["--force"]) == 0
