"""The rank's batch adapters of trainer/rank_program.py, without Ray or DeepSpeed: prompt batches become
(noise, cond) whose global content does not depend on the world size or layout (noise is a function of the
global sample index), a cursor resumes them exactly, and synthetic batches restart at a step."""
from __future__ import annotations

import itertools

import pytest
import torch

from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream, RankBatches
from tests.data_pipeline.helpers import write_shards
from trainer.config import config_from_dict
from trainer.distributed import RankInfo
from trainer.rank_program import PromptBatches, sample_noise, synthetic_batches

SHAPE = (2, 4, 4)


class ByteEncoder:
    """Prompt -> its first 4 UTF-8 bytes as floats (B, 4): distinct per prompt, cheap."""

    def __call__(self, prompts):
        out = torch.zeros(len(prompts), 4)
        for i, p in enumerate(prompts):
            b = list(p.encode())[-4:]
            out[i, : len(b)] = torch.tensor(b, dtype=torch.float32)
        return {"emb": out}


def _cfg(world: int, layout: str = "strided"):
    return config_from_dict({"run": {"seed": 7}, "train": {"batch_size": 4},
                             "cluster": {"student": {"workers": world}}, "data": {"layout": layout}})


def _rank_iters(urls, world: int, layout: str, state=None):
    its = []
    for r in range(world):
        stream = PromptStream(urls, 4, seed=7, options=ReadOptions(), encoder_factory=ByteEncoder)
        it = PromptBatches(_cfg(world, layout), RankBatches(stream, r, world, layout), RankInfo(r, world, 0), SHAPE)
        if state is not None:
            it.load_state_dict(state)
        its.append(it)
    return its


def _global_steps(its, layout: str, n: int):
    """n steps of the global batch, reassembled from the ranks' slices: (noise (4,...), emb (4,4), keys)."""
    out = []
    world = len(its)
    for _ in range(n):
        parts = [next(it) for it in its]
        order = ([(i % world, i // world) for i in range(4)] if layout == "strided"
                 else [(i // (4 // world), i % (4 // world)) for i in range(4)])
        noise = torch.stack([parts[r][0][j] for r, j in order])
        emb = torch.stack([parts[r][1]["emb"][j] for r, j in order])
        keys = [its[r].consumed[-1][j] for r, j in order]
        out.append((noise, emb, keys))
    return out


@pytest.mark.parametrize("world,layout", [(2, "strided"), (2, "contiguous"), (4, "strided")])
def test_global_batches_do_not_depend_on_world_size_or_layout(tmp_path, world, layout):
    urls = write_shards(str(tmp_path), [5, 6, 3])
    one = _global_steps(_rank_iters(urls, 1, "strided"), "strided", 6)  # 24 samples: over an epoch boundary
    many = _global_steps(_rank_iters(urls, world, layout), layout, 6)
    for (n1, e1, k1), (n2, e2, k2) in zip(one, many):
        assert k1 == k2 and torch.equal(n1, n2) and torch.equal(e1, e2)
    # the noise is the global sample's own: batch b, position p -> index 4 b + p
    assert torch.equal(one[2][0][3], sample_noise(7, 2 * 4 + 3, SHAPE))
    assert len({tuple(n.flatten()[:3].tolist()) for step in one for n in step[0]}) == 24  # all distinct


def test_cursor_resumes_the_same_batches_with_another_world_size(tmp_path):
    urls = write_shards(str(tmp_path), [5, 6, 3])
    ref = _global_steps(_rank_iters(urls, 1, "strided"), "strided", 7)
    two = _rank_iters(urls, 2, "strided")
    _global_steps(two, "strided", 3)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["batches"] == 3
    resumed = _global_steps(_rank_iters(urls, 1, "strided", state), "strided", 4)
    for (n1, e1, k1), (n2, e2, k2) in zip(ref[3:], resumed):
        assert k1 == k2 and torch.equal(n1, n2) and torch.equal(e1, e2)
    assert _rank_iters(urls, 1, "strided")[0].metrics() == {}  # nothing consumed yet


def test_batches_without_embeddings_are_a_clear_error(tmp_path):
    urls = write_shards(str(tmp_path), [4])
    it = PromptBatches(_cfg(1), RankBatches(PromptStream(urls, 4, seed=7), 0, 1), RankInfo(0, 1, 0), SHAPE)
    with pytest.raises(ValueError, match="no embeddings"):
        next(it)


def test_synthetic_batches_restart_at_a_step():
    cfg = config_from_dict({"model": {"family": "flux", "latent_channels": 4, "latent_size": 8},
                            "train": {"batch_size": 4}, "cluster": {"student": {"workers": 2}}})
    shapes = {"pooled_prompt_embeds": [3]}
    fresh = list(itertools.islice(synthetic_batches(cfg, RankInfo(1, 2, 0), shapes), 5))
    resumed = list(itertools.islice(synthetic_batches(cfg, RankInfo(1, 2, 0), shapes, start_step=3), 2))
    for (n1, c1), (n2, c2) in zip(fresh[3:], resumed):
        assert torch.equal(n1, n2) and torch.equal(c1["pooled_prompt_embeds"], c2["pooled_prompt_embeds"])


def test_run_seed_changes_the_noise_and_class_labels_are_not_the_noise_stream():
    """torch's CPU generator keeps only the low 32 bits of a seed: keys like seed * 2^32 + index made run.seed a
    no-op and put a sample's class label on its noise's stream. Both are hashed keys now."""
    from trainer.rank_program import sample_class_label

    assert not torch.equal(sample_noise(5, 7, SHAPE), sample_noise(6, 7, SHAPE))
    assert not torch.equal(sample_noise(5, 7, SHAPE), sample_noise(5, 8, SHAPE))
    labels = [sample_class_label(5, i, 1000) for i in range(64)]
    first = [int(torch.randint(1000, (1,), generator=torch.Generator().manual_seed(i))) for i in range(64)]
    assert labels != first and len(set(labels)) > 50  # spread over the classes, not the old noise-stream draws


def test_on_device_moves_data_based_batches_too():
    """Data-based pi-ID batches carry a third item (the samples' DataSegments); the move to the student's device
    keeps it (the digits demo's data-based student crashed here after the device and data-based merges)."""
    from models.piid import DataSegments
    from trainer.rank_program import OnDevice

    seg = DataSegments(torch.ones(2, *SHAPE), torch.tensor([1.0, 0.5], dtype=torch.float64),
                       torch.tensor([0.5, 0.5], dtype=torch.float64))
    batches = OnDevice(iter([(torch.zeros(2, *SHAPE, dtype=torch.float64), None, seg),
                             (torch.zeros(2, *SHAPE), {"c": torch.ones(2)})]), torch.device("cpu"))
    noise, cond, data = next(batches)
    assert noise.dtype == torch.float32 and cond is None and torch.equal(data.x0, seg.x0)
    assert torch.equal(data.tau_src, seg.tau_src) and len(next(batches)) == 2
