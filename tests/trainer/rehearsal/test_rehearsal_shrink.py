"""The rehearsal's shrink (issue 21, trainer/rehearsal/): every production recipe differs from its rehearsal only in
the keys of the one documented table; what the recipe says about engine, precision, checkpointing, placement,
guidance, LoRA, optimizer, EMA, data format and evaluation stays; the shrunk run fits the machine; the tiny
same-family model resolves from a hub cache through the real loader, offline, under the recipe's own hub id."""
from __future__ import annotations

import pytest

from tests.recipes import RECIPES, ROOT
from trainer.rehearsal.shrink import SHRINK, SHRINK_KEYS, Context, Machine, differences, shrink, table_markdown

MACHINE = Machine(cpus=2, memory_gb=24)
# what the rehearsal must leave exactly as the recipe says (issue 21, item 1)
KEPT = ("train.engine", "train.precision", "model.gradient_checkpointing", "model.dtype", "teacher.placement",
        "teacher.guidance", "lora.", "optim.", "ema.", "data.pre_encoded", "eval.", "policy.", "distill.",
        "model.family", "model.num_timesteps", "model.latent_channels", "model.text_dtype", "run.seed",
        "cluster.student.max_failures")


def _ctx(tmp_path, machine=MACHINE) -> Context:
    return Context(machine, 6, str(tmp_path / "run"), str(tmp_path / "shards"), pretrained_dir=str(tmp_path / "dit"))


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_a_recipe_differs_from_its_rehearsal_only_in_the_shrink_table(family, tmp_path):
    recipe, rehearsal, changes = shrink(ROOT / RECIPES[family], _ctx(tmp_path))
    diff = differences(recipe, rehearsal)
    assert set(diff) <= SHRINK_KEYS, sorted(set(diff) - SHRINK_KEYS)
    assert {c.key for c in changes} == set(diff) | {"model.pretrained"}  # a hub id is listed for its weights
    for key in KEPT:
        assert not [k for k in diff if k == key or (key.endswith(".") and k.startswith(key))], key
    # the run as a user would start it: the recipe's engine and numerics, its own hub id
    assert rehearsal.train.engine == "deepspeed" and rehearsal.train.precision == "bf16"
    assert rehearsal.model.gradient_checkpointing is True
    if family != "dit":
        assert rehearsal.model.pretrained == recipe.model.pretrained  # the hub id stays; the cache changes
    assert rehearsal.wandb.mode == "offline" and rehearsal.run.output == str(tmp_path / "run")
    assert rehearsal.train.iters == 6 and rehearsal.train.ckpt_every == 3


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_the_rehearsal_fits_the_machine(family, tmp_path):
    _, cfg, _ = shrink(ROOT / RECIPES[family], _ctx(tmp_path))
    s, t = cfg.cluster.student, cfg.teacher
    teacher_cpus = 0 if t.placement == "shared" else t.replicas * t.cpus_per_replica
    cpus = s.workers * s.cpus_per_worker + cfg.data.workers * cfg.cluster.data_cpus_per_worker + teacher_cpus
    assert s.workers == 2 and cpus <= MACHINE.cpus == cfg.cluster.num_cpus
    assert s.gpus_per_worker == 0 and t.gpus_per_replica == 0  # no GPU here
    assert cfg.train.batch_size % s.workers == 0 and cfg.cluster.address == "local"
    gpu = shrink(ROOT / RECIPES[family], _ctx(tmp_path, Machine(cpus=16, gpus=8, gpu_memory_gb=80)))[1]
    assert gpu.cluster.student.workers == 2 and gpu.cluster.student.gpus_per_worker == 1.0  # the GPU code path
    one = shrink(ROOT / RECIPES[family], _ctx(tmp_path, Machine(cpus=16, gpus=1, gpu_memory_gb=80)))[1]
    assert one.cluster.student.workers == 1  # NCCL: one rank per GPU


def test_user_overrides_apply_on_top_and_are_named_as_overrides(tmp_path):
    _, cfg, changes = shrink(ROOT / RECIPES["flux"], _ctx(tmp_path), ["optim.lr=2e-4", "train.iters=9"])
    kinds = {c.key: c.kind for c in changes}
    assert cfg.optim.lr == 2e-4 and kinds["optim.lr"] == "override"
    assert cfg.train.iters == 9 and kinds["train.iters"] == "override"


def test_the_docs_carry_the_code_table():
    text = (ROOT / "docs" / "rehearse.md").read_text()
    assert table_markdown() in text
    assert len(SHRINK_KEYS) == len(SHRINK)  # one row per key


def test_the_tiny_model_resolves_offline_under_the_hub_id(tmp_path, monkeypatch):
    """The snapshot layout is what huggingface_hub reads: trainer/weights.py's resolver, the preflight's config
    probe and every from_pretrained of the family (transformer, text encoders, VAE) find it with
    HF_HUB_OFFLINE=1; the text encoders also load by hub id (a tokenizer folder has no config.json)."""
    import torch

    from cluster.preflight import check_teacher
    from models.families import get_family, load_text_encoder
    from trainer.rehearsal.snapshot import revision, write_hub_snapshot
    from trainer.weights import resolve_hub_id, with_local_weights

    _, cfg, _ = shrink(ROOT / RECIPES["flux"], _ctx(tmp_path))
    cache = tmp_path / "hub"
    snapshot = write_hub_snapshot(cfg, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hub_id("black-forest-labs/FLUX.1-dev", cfg) == str(snapshot)
    assert snapshot.name == revision("black-forest-labs/FLUX.1-dev")
    check_teacher(cfg)  # the preflight's hub probe
    local = with_local_weights(cfg)
    net = get_family("flux").load_network(local)
    assert (net.config.num_layers, net.config.num_single_layers, net.config.in_channels) == (1, 1, 64)
    assert next(net.parameters()).dtype == torch.bfloat16
    encoded = load_text_encoder(local)(["a red cat", "a photo of a red fox in the snow"])
    assert encoded["prompt_embeds"].shape == (2, 16, 32) and encoded["pooled_prompt_embeds"].shape == (2, 32)
    # by hub id, as `piflow shards encode` and `piflow sample` load them: in a fresh process, since
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, at its import
    code = ("import sys; from trainer.config import config_from_dict; from models.families import "
            "load_text_encoder; import yaml; cfg = config_from_dict(yaml.safe_load(sys.stdin.read())); "
            "e = load_text_encoder(cfg)(['a red cat', 'a photo of a red fox in the snow']); "
            "print(tuple(e['prompt_embeds'].shape), float(e['prompt_embeds'].double().sum()))")
    import os
    import subprocess
    import sys

    from trainer.config import dump_config

    out = subprocess.run([sys.executable, "-c", code], input=dump_config(cfg), capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, total = out.stdout.split(")")[0] + ")", float(out.stdout.split(")")[1])
    assert shape == "(2, 16, 32)" and total == pytest.approx(float(encoded["prompt_embeds"].double().sum()), rel=1e-6)
    vae = get_family("flux").load_vae(local)
    with torch.no_grad():
        image = get_family("flux").decode(vae, torch.zeros(1, 16, 8, 8))
    assert image.shape == (1, 3, 64, 64)  # the real VAE's 8x compression


def test_the_tiny_model_is_stored_as_a_released_one_loads(tmp_path, capfd):
    """Wan keeps rope, time embedder, norms and the scale-shift table in float32 when loaded in bf16
    (`_keep_in_fp32_modules`): the tiny snapshot is stored that way, the rest in the recipe's bf16, without
    diffusers' warning about casting those modules (ModelMixin.to)."""
    import torch
    from safetensors import safe_open

    from trainer.rehearsal.snapshot import write_model_dir

    _, cfg, _ = shrink(ROOT / RECIPES["wan"], _ctx(tmp_path))
    root = write_model_dir(cfg, tmp_path / "wan")
    assert "should be kept in float32" not in capfd.readouterr().err
    keep = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    with safe_open(str(next((root / "transformer").glob("*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    kept = {k for k in dtypes if any(m in k.split(".") for m in keep)}
    assert kept and {dtypes[k] for k in kept} == {torch.float32}
    assert {dtypes[k] for k in dtypes if k not in kept} == {torch.bfloat16}
