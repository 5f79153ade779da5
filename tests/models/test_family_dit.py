"""DiT family (class-conditional, flow matching, T = 1000) on a tiny FM-DiT (the paper's teacher network)."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from models.families import get_family, load_text_encoder
from trainer.config import config_from_dict

C, S = 4, 8


def tiny_cfg(**sections):
    base = {"model": {"family": "dit", "tiny": True, "latent_channels": C, "latent_size": S, "num_timesteps": 1000.0},
            "policy": {"num_components": 32, "logstd_inner_dim": 16},
            "teacher": {"guidance": {"mode": "cfg", "scale": 2.7, "interval": [0.0, 0.6]}}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def test_pack_unpack_round_trip_matches_dit_unpatchify():
    fam = get_family("dit")
    teacher = fam.build_teacher(tiny_cfg())
    x = torch.randn(2, C, S, S)
    tokens = fam.pack(x)
    assert tokens.shape == (2, (S // 2) ** 2, 4 * C)
    assert torch.equal(fam.unpack(tokens, S, S), x)
    # feature (i*p + j)*C + c belongs to channel c
    assert fam.channel_index(C, 2).tolist() == list(range(C)) * 4
    # our un-packing of proj_out_2's tokens is the transformer's own un-patchify
    net = teacher.network
    captured = {}
    hook = net.proj_out_2.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    out = net(x, timestep=torch.tensor([500.0, 200.0]), class_labels=torch.tensor([3, 7])).sample
    hook.remove()
    assert torch.equal(fam.unpack(captured["tokens"], S, S), out)


def test_cfg_applies_only_inside_the_sigma_interval():
    fam = get_family("dit")
    teacher = fam.build_teacher(tiny_cfg())
    x, s = torch.randn(2, C, S, S), torch.tensor([0.8, 0.3])  # sample 0 outside [0, 0.6], sample 1 inside
    c = {"class_labels": torch.tensor([207, 360])}
    u_pos = teacher.unguided(x, s, c)
    u_neg = teacher.unguided(x, s, {"class_labels": torch.tensor([1000, 1000])})  # the null class
    u = teacher(x, s, c)
    assert torch.allclose(u[0], u_pos[0], atol=1e-6)
    assert torch.allclose(u[1], u_neg[1] + 2.7 * (u_pos[1] - u_neg[1]), atol=1e-5)
    assert (u[1] - u_pos[1]).abs().max() > 1e-3


class FlowMatchEulerForDiTPipeline(FlowMatchEulerDiscreteScheduler):
    """The real flow-matching Euler scheduler plus the identity `scale_model_input` hook that DiTPipeline calls
    (an adapter, not a double: flow matching has no input scaling)."""

    def scale_model_input(self, sample, timestep=None):
        return sample


def test_euler_steps_match_dit_pipeline_through_the_vae():
    """Our CFG teacher + Euler on the pipeline's sigmas, decoded with the SD-VAE scale, equals DiTPipeline
    driven by a flow-matching Euler scheduler (t = sigma * 1000, null class 1000, CFG every step)."""
    cfg = tiny_cfg(teacher={"guidance": {"mode": "cfg", "scale": 2.7, "interval": [0.0, 1.0]}})
    fam = get_family("dit")
    teacher = fam.build_teacher(cfg)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=C, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, scaling_factor=0.18215).eval()
    pipe = DiTPipeline(transformer=teacher.network, vae=vae, scheduler=FlowMatchEulerForDiTPipeline(shift=1.0))
    labels = [207, 360]
    images = pipe(class_labels=labels, guidance_scale=2.7, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images  # (B, 3, 8S, 8S), [0, 1]
    sigmas = pipe.scheduler.sigmas
    x = randn_tensor((2, C, S, S), generator=torch.Generator().manual_seed(3))
    c = {"class_labels": torch.tensor(labels)}
    for k in range(2):
        x = x + teacher(x, sigmas[k].expand(2), c) * (sigmas[k + 1] - sigmas[k])
    with torch.no_grad():
        ours = (fam.decode(vae, x) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(ours, images, atol=1e-5)


def test_student_has_no_label_dropout_and_keeps_proj_out_1():
    fam = get_family("dit")
    cfg = tiny_cfg()
    student = fam.build_student(cfg, fam.build_teacher(cfg)).train()
    x, s, c = torch.randn(4, C, S, S), torch.full((4,), 1.0), {"class_labels": torch.tensor([1, 2, 3, 4])}
    a, b = student.mean_velocity(x, s, c), student.mean_velocity(x, s, c)
    assert torch.equal(a, b)  # no random label drop in train mode
    assert student.transformer.proj_out_1.weight.requires_grad  # full fine-tune keeps the adaLN modulation
    assert all(p.requires_grad for p in student.transformer.parameters())
    assert student.head.proj_out_means.out_features == 32 * 4 * C  # K * p^2 * C


def test_epsilon_prediction_dit_is_refused_as_a_flow_matching_teacher(tmp_path):
    """facebook/DiT-XL-2-256 style dirs (learned sigma: 2C outputs; or a scheduler predicting epsilon) are refused
    before any weights load, on the family path and the distributed rank path (`pretrained_class`); a flow dir of
    diffusers' own DiT class loads with that class."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    fam = get_family("dit")
    small = dict(num_attention_heads=2, attention_head_dim=8, in_channels=C, num_layers=1, sample_size=S,
                 patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000)
    learned_sigma, epsilon, flow = tmp_path / "ddpm_ls", tmp_path / "ddpm_eps", tmp_path / "flow"
    DiTTransformer2DModel(**small, out_channels=2 * C).save_pretrained(learned_sigma / "transformer")
    DiTTransformer2DModel(**small, out_channels=C).save_pretrained(epsilon / "transformer")
    DDIMScheduler(prediction_type="epsilon").save_pretrained(epsilon / "scheduler")
    DiTTransformer2DModel(**small, out_channels=C).save_pretrained(flow / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(flow / "scheduler")
    for root, reason in ((learned_sigma, "learned-sigma DDPM DiT"), (epsilon, "DDIMScheduler predicts epsilon")):
        cfg = tiny_cfg(model={"tiny": False, "pretrained": str(root)})
        with pytest.raises(ValueError, match=f"{reason}.*piflow convert dit-fm"):
            fam.build_teacher(cfg)
        with pytest.raises(ValueError, match=reason):
            fam.pretrained_class(cfg)
    teacher = fam.build_teacher(tiny_cfg(model={"tiny": False, "pretrained": str(flow)}))
    assert type(teacher.network) is DiTTransformer2DModel
    u = teacher.unguided(torch.randn(2, C, S, S), torch.tensor([0.5, 0.2]), {"class_labels": torch.tensor([1, 2])})
    assert u.shape == (2, C, S, S)


def test_class_label_prompts():
    encode = load_text_encoder(tiny_cfg())
    assert encode(["207", " 3 "])["class_labels"].tolist() == [207, 3]
    with pytest.raises(ValueError, match="integer class id"):
        encode(["a cat"])
