"""Qwen-Image family on a tiny QwenImageTransformer2DModel and a tiny Qwen2.5-VL text encoder (no downloads)."""
from __future__ import annotations

import pytest
import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)

from models.families import get_family, load_text_encoder
from models.families.flux import pack_2x2, unpack_2x2
from models.text_encoders import save_tiny_text_encoders, tiny_text_encoders
from trainer.config import config_from_dict

C, S = 4, 8


def tiny_cfg(**sections):
    base = {"model": {"family": "qwen_image", "tiny": True, "latent_channels": C, "latent_size": S},
            "policy": {"logstd_inner_dim": 16},
            "teacher": {"guidance": {"mode": "cfg", "scale": 4.0, "interval": [0.0, 1.0]}}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def make_cond(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[0, 4:] = 0  # sample 0 has a shorter prompt
    return {"prompt_embeds": torch.randn(B, 6, 32, generator=g) * mask[..., None], "prompt_embeds_mask": mask,
            "negative_prompt_embeds": torch.randn(1, 3, 32, generator=g).expand(B, -1, -1),
            "negative_prompt_embeds_mask": torch.ones(B, 3, dtype=torch.long)}


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    get_family("qwen_image").load_network(tiny_cfg()).save_pretrained(root / "transformer")
    return root


def test_pack_unpack_round_trip_and_pipeline_layout():
    x = torch.randn(2, C, 4, 6)
    fam = get_family("qwen_image")
    assert torch.equal(fam.pack(x), QwenImagePipeline._pack_latents(x, 2, C, 4, 6))
    assert torch.equal(fam.unpack(fam.pack(x), 4, 6), x)
    ref = QwenImagePipeline._unpack_latents(fam.pack(x), 4 * 8, 6 * 8, 8)[:, :, 0]
    assert torch.equal(ref, x)


def test_cfg_equals_manual_formula_with_padding():
    """Batched cond+uncond (padded to one length, masked) equals two separate forwards combined by hand."""
    fam = get_family("qwen_image")
    teacher = fam.build_teacher(tiny_cfg())
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.9, 0.2]), make_cond()
    u_pos = teacher.unguided(x, s, {"prompt_embeds": c["prompt_embeds"], "prompt_embeds_mask": c["prompt_embeds_mask"]})
    u_neg = teacher.unguided(x, s, {"prompt_embeds": c["negative_prompt_embeds"],
                                    "prompt_embeds_mask": c["negative_prompt_embeds_mask"]})
    assert (u_pos - u_neg).abs().max() > 1e-3
    assert torch.allclose(teacher(x, s, c), u_neg + 4.0 * (u_pos - u_neg), atol=1e-5)
    # a padded, masked prompt gives the same velocity as the unpadded one
    short = {"prompt_embeds": c["prompt_embeds"][:1, :4], "prompt_embeds_mask": c["prompt_embeds_mask"][:1, :4]}
    assert torch.allclose(teacher.unguided(x[:1], s[:1], short), u_pos[:1], atol=1e-5)


def test_teacher_loads_bf16_from_diffusers_dir(saved_transformer):
    fam = get_family("qwen_image")
    t16 = fam.build_teacher(tiny_cfg(model={"tiny": False, "pretrained": str(saved_transformer),
                                            "dtype": "bfloat16"}))
    t32 = fam.build_teacher(tiny_cfg())
    assert next(t16.network.parameters()).dtype == torch.bfloat16
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.9, 0.2]), make_cond()
    u16, u32 = t16(x, s, c), t32(x, s, c)
    assert u16.dtype == torch.float32
    assert (u16 - u32).abs().max() < 0.05 * u32.abs().max()


def test_euler_steps_match_qwen_image_pipeline(saved_transformer):
    """Without CFG (the pipeline's CFG also renormalises per token, pi-Flow's does not, PIFLOW.md §1.3)."""
    cfg = tiny_cfg(model={"tiny": False, "pretrained": str(saved_transformer)})
    teacher = get_family("qwen_image").build_teacher(cfg)
    transformer = QwenImageTransformer2DModel.from_pretrained(saved_transformer, subfolder="transformer")
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.2, use_dynamic_shifting=False),
                             vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    c = make_cond()
    x0 = torch.randn(2, C, S, S, generator=torch.Generator().manual_seed(1))
    taus = [1.0, 0.5]
    out = pipe(prompt_embeds=c["prompt_embeds"], prompt_embeds_mask=c["prompt_embeds_mask"], true_cfg_scale=1.0,
               latents=pack_2x2(x0), sigmas=taus, num_inference_steps=2, height=8 * S, width=8 * S,
               output_type="latent").images
    sigmas = pipe.scheduler.sigmas
    x = x0
    pos = {"prompt_embeds": c["prompt_embeds"], "prompt_embeds_mask": c["prompt_embeds_mask"]}
    for k in range(2):
        x = x + teacher.unguided(x, sigmas[k].expand(2), pos) * (sigmas[k + 1] - sigmas[k])
    assert (unpack_2x2(out, S, S) - x).abs().max() < 1e-5


def test_text_encoder_matches_pipeline_and_adds_empty_negative(tmp_path):
    save_tiny_text_encoders("qwen_image", tmp_path, seed=2)
    encode = load_text_encoder(tiny_cfg(model={"tiny": False, "text_encoder": str(tmp_path)}))
    parts = tiny_text_encoders("qwen_image", seed=2)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None, **parts)
    prompts = ["a red cat", "a small blue dog on a green background"]  # different lengths: a real mask
    got = encode(prompts)
    ref, ref_mask = pipe.encode_prompt(prompts)
    assert got["prompt_embeds"].shape == ref.shape
    assert torch.allclose(got["prompt_embeds"], ref, atol=1e-5)
    assert torch.equal(got["prompt_embeds_mask"], ref_mask.long())
    assert got["prompt_embeds_mask"].sum(1).tolist() == [8, 13]  # prompt words + "<|im_end|> \n <|im_start|> assistant \n"
    neg, _ = pipe.encode_prompt([""])
    assert torch.allclose(got["negative_prompt_embeds"][1:], neg, atol=1e-5)
    assert got["negative_prompt_embeds"].shape[0] == 2


def test_vae_normalisation_matches_pipeline_decode(saved_transformer):
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    transformer = QwenImageTransformer2DModel.from_pretrained(saved_transformer, subfolder="transformer")
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.2), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    c = make_cond(B=1)
    kw = dict(prompt_embeds=c["prompt_embeds"], prompt_embeds_mask=c["prompt_embeds_mask"], true_cfg_scale=1.0,
              latents=pack_2x2(torch.randn(1, C, S, S)), sigmas=[1.0], num_inference_steps=1, height=8 * S,
              width=8 * S)
    latent = unpack_2x2(pipe(output_type="latent", **kw).images, S, S)
    image = pipe(output_type="pt", **kw).images
    fam = get_family("qwen_image")
    with torch.no_grad():
        ours = (fam.decode(vae, latent) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(ours, image, atol=1e-5)
    z = torch.randn(1, C, S, S)
    assert torch.allclose(fam.vae_to_latent(vae, fam.latent_to_vae(vae, z)), z, atol=1e-6)
