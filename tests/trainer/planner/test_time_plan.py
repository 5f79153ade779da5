"""The time planner (trainer/planner/time_plan.py): FLOPs counted on the meta device against the FLUX block arithmetic,
depth scaling against a direct count, the planned bytes of each layout, the cluster spec and `piflow plan`."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from trainer.config import ConfigError, load_config
from trainer.planner.time_plan import HARDWARE, _pass_flops, comm_bytes, count_flops, parse_cluster, trace_passes

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
FLUX = CONFIGS / "flux_dev_gm_k8_4nfe.yaml"


def tiny_flux(tmp_path, depth: tuple[int, int] = (1, 1), extra: tuple[str, ...] = ()):
    """The FLUX recipe on a tiny-width FLUX config saved at `depth` (double, single blocks), LoRA rank 4."""
    from models.families import get_family

    cfg = load_config(FLUX, ["model.tiny=true", "model.latent_size=8", "model.max_sequence_length=8"])
    kwargs = {**get_family("flux").tiny_config(cfg), "num_layers": depth[0], "num_single_layers": depth[1]}
    root = tmp_path / f"flux_{depth[0]}_{depth[1]}"
    with torch.device("meta"):
        get_family("flux").transformer_class(**kwargs).save_config(str(root / "transformer"))
    return load_config(FLUX, [f"model.pretrained={root}", "model.tiny=false", "model.latent_size=8",
                              "model.max_sequence_length=8", "lora.rank=4", "lora.alpha=4.0",
                              "policy.logstd_inner_dim=16", "train.batch_size=4", "train.micro_batch_size=0", "cluster.student.workers=4",
                              *extra])


@pytest.mark.slow
def test_flux_teacher_flops_match_the_block_arithmetic():
    """One FLUX.1-dev forward at 1024^2 (4096 image + 512 text tokens): every block applies 12 D^2 weights per
    token (double blocks: each stream 4 D^2 attention + 8 D^2 MLP on its own tokens; single blocks 3 D^2 qkv +
    4 D^2 MLP-in + 5 D^2 out on all tokens; the adaLN linears see one vector) and attention 4 T^2 D; 2 FLOPs a
    multiply-add. The counted total is within 0.5% of that (embedders, head and LoRA are the rest)."""
    cfg = load_config(FLUX)
    flops = count_flops(cfg)
    D, T = 3072, 4096 + 512
    blocks = 19 + 38
    analytic = blocks * (2 * 12 * D * D * T + 4 * T * T * D)
    assert flops.teacher == pytest.approx(analytic, rel=5e-3)
    # the student step: forward + input-gradient backward + checkpoint recompute of the frozen base (3 passes),
    # plus LoRA r=256 and the GM head (weight gradients too): between 3 and 3.6 teacher forwards
    assert 3.0 < flops.student / flops.teacher < 3.6


def test_depth_scaled_flops_equal_a_direct_count(tmp_path):
    cfg = tiny_flux(tmp_path, depth=(3, 4))
    scaled = count_flops(cfg)
    direct = _pass_flops(cfg, {"num_layers": 3, "num_single_layers": 4})
    assert scaled.teacher == direct.teacher and scaled.student == direct.student
    assert scaled.teacher > 0 and scaled.student > scaled.teacher


def test_planned_bytes_of_each_layout(tmp_path):
    """Per iteration and rank on 4 ranks: the replicated base is never gathered; per_step gathers and reduces the
    (padded) trainables once; per_pass reduces them once per segment; the frozen base crosses nodes only when
    it is sharded over all ranks of 2 nodes, and sharding it within a node gathers it over 2 ranks instead of 4."""
    cfg = tiny_flux(tmp_path)
    traced = trace_passes(cfg)
    student = traced[0]
    params = dict(student.named_parameters())
    trainable = sum(math.ceil(p.numel() / 4) * 4 * 2 for p in params.values() if p.requires_grad)  # bf16
    rep = comm_bytes(cfg, 4, 2, "replicate", "per_step", traced)
    assert rep["gather_frozen"] == 0 and rep["gather_trainable"] == rep["reduce_scatter"] == trainable
    assert rep["gather_trainable_cross_node"] == trainable  # the trainables live on all ranks of both nodes
    per_pass = comm_bytes(cfg, 4, 2, "replicate", "per_pass", traced)
    assert per_pass["reduce_scatter"] == cfg.distill.nfe * trainable
    assert per_pass["gather_trainable"] > 3 * cfg.distill.nfe * 0.5 * trainable  # forward, recompute, backward
    shard = comm_bytes(cfg, 4, 2, "shard", "per_step", traced)
    node = comm_bytes(cfg, 4, 2, "shard_in_node", "per_step", traced)
    assert shard["gather_frozen_cross_node"] == shard["gather_frozen"] > 0
    assert node["gather_frozen_cross_node"] == 0 and 0 < node["gather_frozen"] <= shard["gather_frozen"]
    one_node = comm_bytes(cfg, 4, 4, "shard_in_node", "per_step", traced)
    assert one_node == comm_bytes(cfg, 4, 4, "shard", "per_step", traced)  # one node: the same partition
    # every segment's teacher forwards gather the whole frozen base (adapters off, original output layers) and,
    # of the trainables, only the LoRA A weights ZeRO-3 ties to their LoRA layer (measured: comm_volume)
    frozen = {n for n, p in params.items() if not p.requires_grad}
    teacher = set(traced[1].teacher)
    assert frozen <= teacher and teacher - frozen and all(".lora_A." in n for n in teacher - frozen)


def test_cluster_spec():
    c = parse_cluster("2x8xH100")
    assert (c.nodes, c.gpus_per_node, c.gpus, c.hardware) == (2, 8, 16, HARDWARE["H100"])
    assert c.gpu_mem_gib == pytest.approx(80e9 / 2**30)
    cfg = load_config(FLUX, ["cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=141"])
    c = parse_cluster("", cfg)
    assert (c.nodes, c.gpus_per_node) == (4, 8) and c.gpu_mem_gib == pytest.approx(141e9 / 2**30)
    for bad in ("2x8", "2x8xV100", "0x8xH100", "two"):
        with pytest.raises(ConfigError, match="NODESxGPUSxKIND"):
            parse_cluster(bad)
    with pytest.raises(ConfigError, match="cluster.nodes"):
        parse_cluster("", load_config(FLUX, ["cluster.nodes=0"]))


def test_plan_command_prints_the_time_plan_per_placement(tmp_path, capsys):
    cfg_path = tmp_path / "flux.yaml"
    cfg_path.write_text(FLUX.read_text())
    tiny = tiny_flux(tmp_path, extra=("train.iters=100",))
    assert main(["plan", str(cfg_path), f"model.pretrained={tiny.model.pretrained}", "model.tiny=false",
                 "model.latent_size=8", "model.max_sequence_length=8", "lora.rank=4", "policy.logstd_inner_dim=16",
                 "train.batch_size=4", "train.micro_batch_size=0", "cluster.student.workers=4", "train.iters=100", "--cluster", "2x2xA100",
                 "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "replicate/per_step" in out and "shard_in_node/per_step" in out and "shard/per_step" in out
    assert "shard/per_pass" in out  # the layout before issue 23, for comparison
    assert "0.50 of the 312 TFLOP/s" in out and "NOT measured" in out
    assert "100 iterations, comm not overlapped" in out and "train.frozen_weights=auto takes: replicate" in out
    assert main(["plan", str(cfg_path), "--cluster", "2x8xB200"]) == 2
