"""Students built from tiny teachers of every large family: initialisation (§2.2), LoRA (§3.7), shared
placement, and a short pi-ID run (§3.4)."""
from __future__ import annotations

import pytest
import torch

from models.families import get_family
from models.heads import GMHead
from models.piid import PiIDParams, data_free_iteration
from models.policies import DXPolicy, GMPolicy
from trainer.config import config_from_dict
from trainer.planner.memory import lora_parameter_count

C, S = 4, 8
FLUX_LORA = ["proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
             "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
QWEN_LORA = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
             "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
GUIDANCE = {"flux": {"mode": "embedded", "scale": 3.5},
            "qwen_image": {"mode": "cfg", "scale": 4.0, "interval": [0.0, 1.0]},
            "dit": {"mode": "cfg", "scale": 2.7, "interval": [0.0, 0.6]}}


def tiny_cfg(family: str, **sections):
    base = {"model": {"family": family, "tiny": True, "latent_channels": C, "latent_size": S,
                      "num_timesteps": 1000.0 if family == "dit" else 1.0},
            "policy": {"logstd_inner_dim": 16},
            "teacher": {"guidance": GUIDANCE[family]}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return config_from_dict(base)


def make_cond(family: str, B: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        return {"prompt_embeds": torch.randn(B, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(B, 32, generator=g)}
    if family == "qwen_image":
        mask = torch.ones(B, 6, dtype=torch.long)
        mask[0, 4:] = 0
        return {"prompt_embeds": torch.randn(B, 6, 32, generator=g) * mask[..., None], "prompt_embeds_mask": mask,
                "negative_prompt_embeds": torch.randn(1, 3, 32, generator=g).expand(B, -1, -1),
                "negative_prompt_embeds_mask": torch.ones(B, 3, dtype=torch.long)}
    return {"class_labels": torch.randint(0, 1000, (B,), generator=g)}


FAMILIES = ["flux", "qwen_image", "dit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_gm_student_mean_velocity_equals_teacher_at_init(family):
    torch.manual_seed(0)
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.95, 0.35]), make_cond(family)
    fam = get_family(family)
    cfg = tiny_cfg(family, policy={"init_bias_noise": 0.0})
    teacher = fam.build_teacher(cfg)
    u = teacher.unguided(x, s, c)  # the student never sees CFG; FLUX's embedded guidance is in both
    student = fam.build_student(cfg, teacher)
    assert torch.allclose(student.mean_velocity(x, s, c), u, atol=1e-5)
    policy = student.make_policy(x, s, c)
    assert isinstance(policy, GMPolicy)
    assert torch.allclose(policy.velocity(x, s), u, atol=1e-5)  # §8 property 1 at init
    assert torch.allclose(policy.logstd.flatten(), torch.full((2,), cfg.policy.init_logstd))


@pytest.mark.parametrize("family", FAMILIES)
def test_gm_bias_noise_is_one_value_per_component_and_channel(family):
    torch.manual_seed(0)
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.95, 0.35]), make_cond(family)
    fam = get_family(family)
    cfg = tiny_cfg(family)  # init_bias_noise 0.05
    teacher = fam.build_teacher(cfg)
    u = teacher.unguided(x, s, c)
    means = fam.build_student(cfg, teacher)(x, s, c)[0]  # (B, K, C, H, W)
    delta = means - u.unsqueeze(1)  # the bias perturbation
    per_kc = delta.mean(dim=(0, 3, 4), keepdim=True)  # (1, K, C, 1, 1)
    assert torch.allclose(delta, per_kc.expand_as(delta), atol=1e-5)  # constant over samples and pixels
    assert 0.02 < per_kc.std() < 0.1  # ~N(0, 0.05^2), distinct components
    assert means.shape == (2, 8, C, S, S)


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_dx_student_grid_starts_at_teacher_x0(family):
    torch.manual_seed(0)
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.95, 0.35]), make_cond(family)
    fam = get_family(family)
    cfg = tiny_cfg(family, policy={"type": "dx", "num_grid": 10})
    teacher = fam.build_teacher(cfg)
    x0_teacher = x - s.view(-1, 1, 1, 1) * teacher.unguided(x, s, c)
    policy = fam.build_student(cfg, teacher).make_policy(x, s, c)
    assert isinstance(policy, DXPolicy)
    assert torch.allclose(policy.x0_grid, x0_teacher.unsqueeze(1).expand(-1, 10, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_dx_student_polynomial_starts_at_teacher_x0_over_the_segment(family):
    torch.manual_seed(0)
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.95, 0.35]), make_cond(family)
    fam = get_family(family)
    cfg = tiny_cfg(family, policy={"type": "dx", "num_grid": 6, "dx_mode": "polynomial"})
    teacher = fam.build_teacher(cfg)
    x0_teacher = x - s.view(-1, 1, 1, 1) * teacher.unguided(x, s, c)
    student = fam.build_student(cfg, teacher)
    policy = student.make_policy(x, s, c)
    assert isinstance(policy, DXPolicy) and policy.mode == "polynomial" and policy.x0_grid.shape[1] == 6
    assert policy.x0_grid[:, 1:].abs().max() == 0  # higher coefficients start at zero
    for f in (1.0, 0.9, 0.5):  # the teacher's x0 held over the segment, like the grid at init
        assert torch.allclose(policy.x0(s * f), x0_teacher, atol=1e-5)
    assert torch.allclose(student.mean_velocity(x, s, c), teacher.unguided(x, s, c), atol=1e-5)


@pytest.mark.parametrize("family,targets", [("flux", FLUX_LORA), ("qwen_image", QWEN_LORA)])
def test_lora_trains_only_adapters_heads_and_norm_out(family, targets):
    fam = get_family(family)
    cfg = tiny_cfg(family, lora={"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": targets})
    reference = fam.load_network(cfg)
    excluded = set()
    if family == "qwen_image":  # the last block's text MLP has no consumer: no adapter (PIFLOW.md §5)
        excluded = {f"transformer_blocks.1.txt_mlp.{t}" for t in ("net.0.proj", "net.2")}
    # the planner's closed form r * (in + out) per adapted Linear, checked here against peft's real adapters
    expected = lora_parameter_count(reference, targets, 4, excluded)
    student = fam.build_student(cfg, fam.build_teacher(cfg))
    head = sum(p.numel() for p in student.head.parameters())
    norm_out = sum(p.numel() for p in student.tail.parameters())
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    lora = sum(p.numel() for n, p in trainable.items() if "lora_" in n)
    assert lora == expected > 0
    assert sum(p.numel() for p in trainable.values()) == lora + head + norm_out
    assert all("lora_" in n or n.startswith(("head.", "tail.")) for n in trainable)
    assert not any("lora_" in n for n, _ in student.transformer.named_parameters()
                   if any(n.startswith(e) for e in excluded))
    assert isinstance(student.head, GMHead)


@pytest.mark.parametrize("family,targets", [("flux", FLUX_LORA), ("qwen_image", QWEN_LORA)])
def test_shared_placement_teacher_equals_separate_teacher(family, targets):
    fam = get_family(family)
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.8, 0.2]), make_cond(family)
    separate = fam.build_teacher(tiny_cfg(family))
    cfg = tiny_cfg(family, lora={"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": targets},
                   teacher={"placement": "shared"})
    shared = fam.build_teacher(cfg)
    student = fam.build_student(cfg, shared)
    assert shared.network is None  # rebound to the student's trunk
    before = student.mean_velocity(x, s, c).detach()
    with torch.no_grad():  # make the adapters matter, as after training
        for n, p in student.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert (student.mean_velocity(x, s, c) - before).abs().max() > 1e-3
    assert torch.allclose(shared(x, s, c), separate(x, s, c), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_piid_steps_reduce_the_loss(family):
    torch.manual_seed(0)
    fam = get_family(family)
    cfg = tiny_cfg(family)
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher)
    c = make_cond(family)
    noise = torch.randn(2, C, S, S, generator=torch.Generator().manual_seed(5))
    params = PiIDParams(nfe=2, final_step_scale=0.5, shift=3.2, total_substeps=32, num_intermediate=2,
                        window_substeps=0.0, loss_scale=30.0, dropout=0.0)

    def make_policy(x, sigma):
        return student.make_policy(x, sigma, c)

    def iteration(train: bool) -> float:
        total = 0.0
        for loss, _ in data_free_iteration(make_policy, teacher, noise, c, params,
                                           generator=torch.Generator().manual_seed(7)):
            if train:
                loss.backward()
            total += float(loss.detach())
        return total

    opt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.no_grad():
        initial = iteration(train=False)
    for _ in range(20):
        opt.zero_grad()
        iteration(train=True)
        opt.step()
    with torch.no_grad():
        final = iteration(train=False)
    assert final < 0.7 * initial, (initial, final)


@pytest.mark.parametrize("family", ["flux", "qwen_image", "dit", "wan"])
def test_recipes_build_encode_and_train_one_iteration(family):
    """Each production recipe (its rehearsal config: the tiny same-family model loaded from its directory):
    teacher, student, prompt encoding and one data-free pi-ID iteration, end to end."""
    from models.families import load_text_encoder
    from tests.recipes import recipe_config

    cfg = recipe_config(family)
    fam = get_family(cfg.model.family)
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher)
    c = load_text_encoder(cfg)(cfg.eval.prompts)
    if family == "dit":  # data-based in the recipe: this checks the data-free iteration on its model
        assert cfg.distill.data_free
    d = cfg.distill
    params = PiIDParams(nfe=d.nfe, final_step_scale=d.final_step_scale, shift=d.shift,
                        total_substeps=d.total_substeps, num_intermediate=d.num_intermediate,
                        window_substeps=d.window_substeps, loss_scale=d.loss_scale, dropout=cfg.policy.dropout)
    noise = torch.randn(len(cfg.eval.prompts), *fam.latent_shape(cfg), generator=torch.Generator().manual_seed(0))
    losses = []
    for loss, _ in data_free_iteration(lambda x, s: student.make_policy(x, s, c), teacher, noise, c, params,
                                       generator=torch.Generator().manual_seed(1)):
        loss.backward()
        losses.append(float(loss.detach()))
    assert len(losses) == d.nfe and all(l > 0 for l in losses)
    grads = [p.grad for p in student.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    if cfg.lora.enabled:
        assert any(n.endswith("lora_B.default.weight") and p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in student.named_parameters())


@pytest.mark.parametrize("family,targets", [("flux", FLUX_LORA), ("qwen_image", QWEN_LORA)])
def test_bf16_base_with_fp32_trainables_and_checkpointing(family, targets):
    """The real-run layout: frozen bf16 base, fp32 LoRA/head/norm_out, gradient checkpointing, float32 policy."""
    fam = get_family(family)
    cfg = tiny_cfg(family, model={"dtype": "bfloat16", "gradient_checkpointing": True},
                   lora={"enabled": True, "rank": 4, "alpha": 4.0, "target_modules": targets},
                   teacher={"placement": "shared"})
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher).train()
    x, s, c = torch.randn(2, C, S, S), torch.tensor([0.9, 0.5]), make_cond(family)
    policy = student.make_policy(x, s, c)
    assert policy.means.dtype == torch.float32
    u_t = teacher(0.9 * x, 0.9 * s, c)
    assert u_t.dtype == torch.float32
    ((policy.velocity(0.9 * x, 0.9 * s) - u_t) ** 2).mean().backward()
    trainable = student.trainable_parameters()
    assert {p.dtype for p in trainable} == {torch.float32}
    assert all(p.grad is not None for p in trainable)
    frozen = [p for p in student.transformer.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
