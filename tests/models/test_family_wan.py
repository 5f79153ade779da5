"""Wan 2.1 T2V family on a tiny WanTransformer3DModel, a tiny UMT5 and a tiny Wan VAE (real diffusers/transformers
classes, tiny configs, no downloads): the folded video layout against the transformer's own un-patchify, the
prompt encoder and CFG against WanPipeline, teacher + Euler against WanPipeline to 1e-5, the student (init,
LoRA, shared teacher, pi-ID), the 14B count on meta, and the recipe (its rehearsal config: the tiny same-family
model loaded from its hub snapshot) trained, exported and sampled to a GIF."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from models.families import get_family
from models.heads import GMHead
from models.piid import PiIDParams, data_free_iteration
from trainer.config import config_from_dict, load_config
from trainer.planner.memory import count_model, lora_parameter_count

ROOT = Path(__file__).resolve().parents[2]
C, T, S = 4, 3, 8  # latent channels, latent frames, frame size
LORA = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
        "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2", "time_embedder.linear_1", "time_embedder.linear_2"]


def tiny_cfg(**sections):
    base = {"model": {"family": "wan", "tiny": True, "latent_channels": C, "latent_size": S, "latent_frames": T,
                      "num_timesteps": 1000.0, "max_sequence_length": 16},
            "policy": {"logstd_inner_dim": 16},
            "teacher": {"guidance": {"mode": "cfg", "scale": 5.0, "interval": [0.0, 1.0]}}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def make_cond(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, 16, 32, generator=g)
    pos[:, 6:] = 0  # zero past the tokens, as the pipeline pads
    neg = torch.randn(1, 16, 32, generator=g)
    neg[:, 2:] = 0
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg.expand(B, -1, -1)}


def folded_noise(B=2, seed=3):
    return torch.randn(B, C, T * S, S, generator=torch.Generator().manual_seed(seed))


def test_folded_layout_is_the_transformers_own_unpatchify():
    fam, cfg = get_family("wan"), tiny_cfg()
    assert fam.latent_shape(cfg) == (C, T * S, S)
    x = folded_noise()
    assert torch.equal(fam.to_video(cfg, x)[:, :, 1], x[:, :, S:2 * S])  # frame t = rows [t*S, (t+1)*S)
    assert torch.equal(fam.unpack(fam.pack(x), T * S, S), x)
    net = fam.load_network(cfg)
    captured = {}
    net.proj_out.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    with torch.no_grad():
        out = net(**fam.network_inputs(cfg, net, x, torch.tensor([0.7, 0.2]), make_cond()), return_dict=False)[0]
    assert out.shape == (2, C, T, S, S)
    # the network's own un-patchify of proj_out's tokens equals ours on the folded image
    assert torch.equal(fam.from_video(out), fam.unpack(captured["tokens"], T * S, S))
    assert fam.channel_index(C, 2).tolist() == [c for _ in range(4) for c in range(C)]  # channel-last


def tiny_pipeline(cfg):
    fam = get_family("wan")
    enc = fam.load_text_encoder(cfg)
    pipe = WanPipeline(tokenizer=enc.tok, text_encoder=enc.model, vae=fam.load_vae(cfg),
                       transformer=fam.load_network(cfg), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe, enc


def test_prompt_encoder_matches_wan_pipeline():
    cfg = tiny_cfg()
    pipe, enc = tiny_pipeline(cfg)
    prompts = ["a red  cat", "a small blue dog &amp; a cat"]
    pos, neg = pipe.encode_prompt(prompts, negative_prompt="", max_sequence_length=16, device="cpu")
    ours = enc(prompts)
    assert torch.allclose(ours["prompt_embeds"], pos.float(), atol=1e-6)
    assert torch.allclose(ours["negative_prompt_embeds"], neg.float(), atol=1e-6)
    assert ours["prompt_embeds"][0, 5:].abs().max() == 0 < ours["prompt_embeds"][0, :4].abs().max()


def test_cfg_is_u_neg_plus_g_times_difference():
    fam, cfg = get_family("wan"), tiny_cfg()
    teacher = fam.build_teacher(cfg)
    x, s, c = folded_noise(), torch.tensor([0.9, 0.3]), make_cond()
    u_pos = teacher.unguided(x, s, c)
    u_neg = teacher.unguided(x, s, {"prompt_embeds": c["negative_prompt_embeds"]})
    assert (u_pos - u_neg).abs().max() > 1e-3
    assert torch.allclose(teacher(x, s, c), u_neg + 5.0 * (u_pos - u_neg), atol=1e-5)


def test_teacher_euler_and_decode_match_wan_pipeline():
    """Our CFG teacher + Euler on the pipeline's sigmas equals WanPipeline (output_type latent) to 1e-5, and our
    VAE normalisation + decode equals the pipeline's decoded video: pins sign, time scale, CFG and layout."""
    cfg = tiny_cfg()
    fam = get_family("wan")
    pipe, enc = tiny_pipeline(cfg)
    teacher = fam.build_teacher(cfg)
    prompts = ["a red cat", "a small blue dog"]
    latents = fam.to_video(cfg, folded_noise())
    kwargs = dict(prompt=prompts, negative_prompt="", height=8 * S, width=8 * S, num_frames=4 * (T - 1) + 1,
                  num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16, latents=latents.clone())
    theirs = pipe(**kwargs, output_type="latent").frames  # (B, C, T, H, W)
    cond = enc(prompts)
    x = fam.from_video(latents)
    sigmas = pipe.scheduler.sigmas
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * teacher(x, sigmas[i].expand(2), cond)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.allclose(fam.from_video(theirs.float()), x, atol=1e-5), (fam.from_video(theirs) - x).abs().max()
    video = pipe(**kwargs, output_type="pt").frames  # (B, F, 3, H', W') in [0, 1]
    ours = (fam.decode(pipe.vae, fam.from_video(theirs.float()), cfg=cfg) / 2 + 0.5).clamp(0, 1)
    assert ours.shape == (2, 3, 2 * (T - 1) + 1, 2 * S, 2 * S)  # the tiny VAE: 2x in time and space
    assert torch.allclose(ours.permute(0, 2, 1, 3, 4), video.float(), atol=1e-5)


def test_gm_student_starts_at_the_teacher_with_bias_noise_per_component_and_channel():
    fam = get_family("wan")
    x, s, c = folded_noise(), torch.tensor([0.95, 0.35]), make_cond()
    cfg = tiny_cfg(policy={"init_bias_noise": 0.0})
    teacher = fam.build_teacher(cfg)
    u = teacher.unguided(x, s, c)
    student = fam.build_student(cfg, teacher)
    assert torch.allclose(student.mean_velocity(x, s, c), u, atol=1e-5)
    policy = student.make_policy(x, s, c)
    assert torch.allclose(policy.velocity(x, s), u, atol=1e-5)
    assert torch.allclose(policy.logstd.flatten(), torch.full((2,), cfg.policy.init_logstd))
    noisy = fam.build_student(tiny_cfg(), fam.build_teacher(tiny_cfg()))
    means = noisy(x, s, c)[0]  # (B, K, C, T*H, W): one mixture per latent voxel
    assert means.shape == (2, 8, C, T * S, S)
    delta = means - u.unsqueeze(1)
    per_kc = delta.mean(dim=(0, 3, 4), keepdim=True)
    assert torch.allclose(delta, per_kc.expand_as(delta), atol=1e-5)
    assert 0.02 < per_kc.std() < 0.1


def test_lora_on_attention_and_ffn_and_shared_teacher_equals_separate():
    fam = get_family("wan")
    lora = {"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": LORA}
    cfg = tiny_cfg(lora=lora, teacher={"placement": "shared"})
    expected = lora_parameter_count(fam.load_network(cfg), LORA, 4, [])
    separate = fam.build_teacher(tiny_cfg())
    shared = fam.build_teacher(cfg)
    student = fam.build_student(cfg, shared)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    n_lora = sum(p.numel() for n, p in trainable.items() if "lora_" in n)
    adapted = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert n_lora == expected > 0 and len(adapted) == 2 * 10 + 2  # 2 blocks x (8 attention + 2 FFN) + time MLP
    assert sum(p.numel() for p in trainable.values()) == n_lora + sum(p.numel() for p in student.head.parameters())
    assert isinstance(student.head, GMHead)
    x, s, c = folded_noise(), torch.tensor([0.8, 0.2]), make_cond()
    before = student.mean_velocity(x, s, c).detach()
    with torch.no_grad():
        for n, p in student.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert (student.mean_velocity(x, s, c) - before).abs().max() > 1e-3
    assert torch.allclose(shared(x, s, c), separate(x, s, c), atol=1e-5)


def test_twenty_piid_steps_reduce_the_loss():
    torch.manual_seed(0)
    fam, cfg = get_family("wan"), tiny_cfg()
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher)
    c, noise = make_cond(), folded_noise(seed=5)
    params = PiIDParams(nfe=2, final_step_scale=0.5, shift=3.0, total_substeps=32, num_intermediate=2,
                        window_substeps=0.0, loss_scale=30.0, dropout=0.0)

    def iteration(train: bool) -> float:
        total = 0.0
        for loss, _ in data_free_iteration(lambda x, s: student.make_policy(x, s, c), teacher, noise, c, params,
                                           generator=torch.Generator().manual_seed(7)):
            if train:
                loss.backward()
            total += float(loss.detach())
        return total

    opt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.no_grad():
        initial = iteration(False)
    for _ in range(20):
        opt.zero_grad()
        iteration(True)
        opt.step()
    with torch.no_grad():
        final = iteration(False)
    assert final < 0.7 * initial, (initial, final)


def wan_closed_form(d=5120, ffn=13824, layers=40, text=4096, freq=256, c_in=16, c_out=16) -> int:
    """Wan2.1 T2V 14B parameters written out from the architecture (independent of diffusers' module tree)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(d, d) + 2 * d  # q, k, v, out + RMS norms of q and k across heads
    block = 2 * attention + 2 * d + linear(d, ffn) + linear(ffn, d) + 6 * d  # + cross-attn LayerNorm, adaLN table
    root = (c_in * 4 * d + d) + linear(freq, d) + linear(d, d) + linear(d, 6 * d) + linear(text, d) + linear(d, d) \
        + linear(d, 4 * c_out) + 2 * d
    return layers * block + root


def test_plan_counts_the_released_14b_on_meta(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / "wan_t2v_14b_gm_k8_4nfe.yaml")
    counts = count_model(cfg)
    assert counts.total == wan_closed_form() and 14.0e9 < counts.total < 14.5e9
    assert counts.num_blocks == 40 and counts.hidden == 5120
    assert counts.lora == sum(256 * (i + o) for i, o in [(5120, 5120)] * 8 + [(5120, 13824), (13824, 5120)]) * 40 \
        + 256 * (256 + 5120) + 256 * (5120 + 5120)
    from cluster.cli import main

    assert main(["plan", "configs/wan_t2v_14b_gm_k8_4nfe.yaml", "--gpus", "32", "--gpu-mem", "80"]) == 0
    stdout = capsys.readouterr().out
    assert "WanTransformer3DModel (public config): 14.29B parameters in 40 blocks" in stdout
    assert "32760 tokens/sample" in stdout  # 21 frames x 30 x 52 patches
    assert "this config (lora+ckpt): FITS" in stdout


@pytest.mark.slow
def test_recipe_trains_exports_and_samples_a_clip(tmp_path):
    """The Wan recipe through the real rank program (torch engine in one process, shared teacher, checkpoints),
    export, then `piflow sample` writes an animated GIF of the clip decoded by the snapshot's Wan VAE."""
    import yaml
    from PIL import Image

    from models.pipeline import PiFlowPipeline
    from tests.recipes import FP32, IN_PROCESS, recipe_dict
    from trainer.rank_program import run_rank

    data = recipe_dict("wan", *IN_PROCESS, *FP32, output=str(tmp_path / "run"))
    data["distill"]["total_substeps"] = 16
    data["train"]["iters"] = data["train"]["ckpt_every"] = 4
    data["policy"]["num_components"] = 2
    cfg = config_from_dict(data)
    Cw, F, H, W = cfg.model.latent_channels, cfg.model.latent_frames, cfg.model.latent_size, cfg.model.latent_width
    summary = run_rank(cfg, cond_shapes={"prompt_embeds": [16, 32], "negative_prompt_embeds": [16, 32]})
    assert summary["steps"] == 4 and summary["checkpoint_steps"] == [4]
    losses = [yaml.safe_load(line)["loss"] for line in Path(summary["metrics_path"]).read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4 and all(0 < v < float("inf") for v in losses)

    from trainer.export.pipeline import export_student, export_summary

    out = tmp_path / "export"
    export_student(str(tmp_path / "run"), out)
    assert export_summary(out)["kind"] == "lora" and export_summary(out)["family"] == "wan"
    from cluster.cli import main

    gif = tmp_path / "clip.gif"
    assert main(["sample", str(out), "--prompt", "a red cat", "--seed", "3", "--out", str(gif)]) == 0
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 4 * (F - 1) + 1  # the Wan VAE: 4x in time, 3 -> 9 frames
        assert im.size == (8 * W, 8 * H)  # and 8x in space
    pipe = PiFlowPipeline.from_pretrained(str(out))
    expected = pipe(prompt=["a red cat"], generator=[torch.Generator().manual_seed(3)], output_type="latent")
    got = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert got.shape == (1, Cw, F * H, W) and torch.allclose(got, expected, atol=1e-6)
    # the export stands alone: diffusers only, this project blocked, same latents as this project's pipeline
    from tests.trainer.export.test_export_standalone import run_diffusers_only

    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    expected = pipe(prompt=["a red cat"], num_images=2, num_inference_steps=4, generator=gens, output_type="latent")
    info = run_diffusers_only(out, tmp_path, ["a red cat"], "latent-only")
    assert info["project_imported"] == [] and info["modules"] == ["policy_head", "text_encoder", "transformer", "vae"]
    got = torch.load(tmp_path / "standalone.pt", weights_only=True)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4, (got - expected).abs().max()
