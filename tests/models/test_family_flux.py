"""FLUX family on a tiny FluxTransformer2DModel (real diffusers class, tiny config, no downloads)."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from models.families import get_family, load_text_encoder
from models.families.flux import latent_image_ids, pack_2x2, unpack_2x2
from models.text_encoders import save_tiny_text_encoders, tiny_text_encoders
from trainer.config import config_from_dict

C, S = 4, 8  # latent channels, latent size


def tiny_cfg(**sections) -> "object":
    base = {"model": {"family": "flux", "tiny": True, "latent_channels": C, "latent_size": S},
            "policy": {"logstd_inner_dim": 16},
            "teacher": {"guidance": {"mode": "embedded", "scale": 3.5}}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def cond(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(B, T, 32, generator=g), "pooled_prompt_embeds": torch.randn(B, 32, generator=g)}


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    fam = get_family("flux")
    net = fam.load_network(tiny_cfg())
    net.save_pretrained(root / "transformer")
    return root


def test_pack_unpack_round_trip_and_pipeline_layout():
    x = torch.randn(3, C, 6, 10)
    tokens = pack_2x2(x)
    assert tokens.shape == (3, 15, 4 * C)
    assert torch.equal(unpack_2x2(tokens, 6, 10), x)
    # the same layout and ids as diffusers' FLUX pipeline
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, C, 6, 10))
    assert torch.equal(latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))
    # feature f of a token belongs to latent channel f // 4
    assert get_family("flux").channel_index(C, 2).tolist() == [c for c in range(C) for _ in range(4)]


def test_teacher_loads_bf16_from_diffusers_dir_and_returns_float32(saved_transformer):
    fam = get_family("flux")
    t32 = fam.build_teacher(tiny_cfg(model={"tiny": False, "pretrained": str(saved_transformer)}))
    t16 = fam.build_teacher(tiny_cfg(model={"tiny": False, "pretrained": str(saved_transformer),
                                            "dtype": "bfloat16"}))
    assert next(t16.network.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in t16.network.parameters()) and not t16.network.training
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.9, 0.3]), cond()
    u16, u32 = t16(x, s, c), t32(x, s, c)
    assert u16.dtype == torch.float32 and u16.shape == x.shape
    assert (u16 - u32).abs().max() < 0.05 * u32.abs().max()
    # the tiny build from the same seed is the saved network
    assert torch.allclose(fam.build_teacher(tiny_cfg())(x, s, c), u32, atol=1e-6)


def test_embedded_guidance_reaches_the_teacher():
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.9, 0.3]), cond()
    fam = get_family("flux")
    u35 = fam.build_teacher(tiny_cfg())(x, s, c)
    u10 = fam.build_teacher(tiny_cfg(teacher={"guidance": {"mode": "embedded", "scale": 1.0}}))(x, s, c)
    assert (u35 - u10).abs().max() > 1e-4
    with pytest.raises(ValueError, match="embedded"):
        fam.build_teacher(tiny_cfg(teacher={"guidance": {"mode": "none", "scale": 1.0}}))(x, s, c)


def test_euler_steps_match_flux_pipeline(saved_transformer):
    """Our teacher wrapper + Euler on the pipeline's own sigmas equals FluxPipeline (pins sign, time, guidance)."""
    cfg = tiny_cfg(model={"tiny": False, "pretrained": str(saved_transformer)})
    teacher = get_family("flux").build_teacher(cfg)
    transformer = FluxTransformer2DModel.from_pretrained(saved_transformer, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.2, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    B, c = 2, cond()
    x0 = torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(1))
    taus = [1.0, 0.6]  # raw times; the scheduler warps them with the static shift 3.2
    out = pipe(prompt_embeds=c["prompt_embeds"], pooled_prompt_embeds=c["pooled_prompt_embeds"],
               latents=pack_2x2(x0), sigmas=taus, num_inference_steps=len(taus), guidance_scale=3.5,
               height=8 * S, width=8 * S, output_type="latent").images
    sigmas = pipe.scheduler.sigmas  # [warp(1), warp(0.6), 0]
    assert abs(float(sigmas[1]) - 3.2 * 0.6 / (1 + 2.2 * 0.6)) < 1e-6
    x = x0
    for k in range(len(taus)):
        s = sigmas[k].expand(B)
        x = x + teacher(x, s, c) * (sigmas[k + 1] - sigmas[k])
    assert (unpack_2x2(out, S, S) - x).abs().max() < 1e-5


def test_text_encoder_loads_from_dir_and_matches_pipeline(tmp_path):
    save_tiny_text_encoders("flux", tmp_path, seed=3)
    cfg = tiny_cfg(model={"tiny": False, "text_encoder": str(tmp_path), "max_sequence_length": 16})
    encode = load_text_encoder(cfg)
    prompts = ["a photo of a red cat", "a handwritten seven"]
    got = encode(prompts)
    assert got["prompt_embeds"].shape == (2, 16, 32) and got["pooled_prompt_embeds"].shape == (2, 32)
    parts = tiny_text_encoders("flux", seed=3)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None, **parts)
    ref_seq, ref_pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    assert torch.allclose(got["prompt_embeds"], ref_seq, atol=1e-6)
    assert torch.allclose(got["pooled_prompt_embeds"], ref_pooled, atol=1e-6)
    assert not torch.allclose(got["pooled_prompt_embeds"][0], got["pooled_prompt_embeds"][1])


def test_vae_normalisation_matches_pipeline_decode(saved_transformer):
    """Decoding our final latent equals the pipeline's own latent -> image path (shift/scale factors)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=C, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611).eval()
    transformer = FluxTransformer2DModel.from_pretrained(saved_transformer, subfolder="transformer")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.2), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    c = cond(B=1)
    kw = dict(prompt_embeds=c["prompt_embeds"], pooled_prompt_embeds=c["pooled_prompt_embeds"],
              latents=pack_2x2(torch.randn(1, C, S, S)), sigmas=[1.0], num_inference_steps=1, height=8 * S,
              width=8 * S)
    latent = unpack_2x2(pipe(output_type="latent", **kw).images, S, S)
    image = pipe(output_type="pt", **kw).images  # (1, 3, 8S, 8S) in [0, 1]
    fam = get_family("flux")
    with torch.no_grad():
        ours = (fam.decode(vae, latent) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(ours, image, atol=1e-5)
    z = torch.randn(1, C, S, S)
    assert torch.allclose(fam.latent_to_vae(vae, fam.vae_to_latent(vae, z)), z, atol=1e-6)
