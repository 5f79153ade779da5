"""Data-based pi-ID through the real loop (PIFLOW.md §3.1): latent shards (txt + latent.npy) -> PromptStream ->
PromptBatches -> train_loop with the ImageNet recipe's rehearsal config (its tiny same-family DiT; class labels
encoded on the fly). Each sample's x_src is built from its own shard latent and the segment of its global
index; the teacher is only queried inside that segment; training lowers the loss on a fixed batch."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch


from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream, RankBatches
from models.families import get_family, load_text_encoder
from models.piid import DataSegments, data_iteration
from models.timesteps import sample_segment_of, warp
from tests.data_pipeline.helpers import tar_bytes
from tests.recipes import FP32, IN_PROCESS, recipe_config, recipe_path
from trainer.config import load_config
from trainer.distributed import RankInfo
from trainer.engine import build_engine
from trainer.loop import piid_params, train_loop
from trainer.rank_program import PromptBatches, cond_to

SHAPE = (4, 8, 8)


def latent_of(i: int) -> np.ndarray:
    """Sample i's data latent: two 'classes' of structured latents (a mean image per class plus noise)."""
    g = np.random.default_rng(i)
    base = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8) * (1 if i % 2 else -1)
    return (base + 0.2 * g.standard_normal(SHAPE)).astype(np.float32)


def write_latent_shards(root: Path, sizes=(6, 6), with_latent=True) -> list[str]:
    urls, i = [], 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            members = {"txt": str(207 if i % 2 else 360).encode()}
            if with_latent:
                buf = io.BytesIO()
                np.save(buf, latent_of(i))
                members["latent.npy"] = buf.getvalue()
            samples.append((f"{i:06d}", members))
            i += 1
        path = root / f"shard-{s:06d}.tar"
        path.write_bytes(tar_bytes(samples))
        urls.append(str(path))
    return urls


def _cfg(shards: str, iters: int = 6):
    # a training-behaviour test: lr and schedule short enough to see the loss fall in 6 steps
    return recipe_config("dit", *IN_PROCESS, *FP32, "distill.data_free=false", f"data.shards={shards}",
                         f"train.iters={iters}", "distill.nfe=2", "train.batch_size=4", "optim.lr=5e-4",
                         "optim.warmup_iters=1", "optim.grad_clip_start=2", "ema.start=1",
                         "train.micro_batch_size=0")  # one forward per step: the test counts them


def _batches(cfg, urls):
    stream = PromptStream(urls, cfg.train.batch_size, seed=cfg.run.seed,
                          options=ReadOptions(shuffle_shards=False, shuffle_within_shard=False),
                          encoder_factory=lambda: load_text_encoder(cfg))
    # the embeddings arrive as stored (EmbeddingBatch); a rank's OnDevice converts them, as cond_to does here
    for noise, cond, *rest in PromptBatches(cfg, RankBatches(stream, 0, 1), RankInfo(0, 1, 0), SHAPE):
        yield (noise, cond_to(cond, torch.device("cpu")), *rest)


def test_data_based_training_run_on_latent_shards(tmp_path):
    torch.manual_seed(0)
    urls = write_latent_shards(tmp_path)
    cfg = _cfg(str(tmp_path))
    fam = get_family("dit")
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher)
    engine = build_engine(cfg, student)
    params = piid_params(cfg)

    # a fixed evaluation batch (the first 4 samples) and its loss before training
    fixed = next(_batches(cfg, urls))
    noise, cond, data = fixed
    assert isinstance(data, DataSegments) and set(cond) == {"class_labels"}
    assert torch.equal(data.x0[3], torch.from_numpy(latent_of(3)))  # the shard latents, in stream order
    assert [(float(t), float(s)) for t, s in zip(data.tau_src, data.segment)] == \
        [sample_segment_of(cfg.run.seed, i, 2, 1.0) for i in range(4)]

    def fixed_loss() -> float:
        with torch.no_grad():
            (loss, _), = data_iteration(lambda x, s: student.make_policy(x, s, cond), teacher, noise, data, cond,
                                        params, 0.0, torch.Generator().manual_seed(9))
        return float(loss)

    before = fixed_loss()
    seen, queries = [], []

    def make_policy(x, s, c):
        seen.append((x.detach().clone(), s.detach().clone()))
        return student.make_policy(x, s, c)

    def recording_teacher(x, s, c):
        queries.append((len(seen) - 1, s.detach().clone()))
        return teacher(x, s, c)

    steps = train_loop(cfg, engine, make_policy, recording_teacher, _batches(cfg, urls), progress=False,
                       generator=torch.Generator().manual_seed(1))
    assert steps == 6 and len(seen) == 6  # one student forward per data-based iteration
    for it, (x_src, sigma_src) in enumerate(seen):
        index = [(it * 4 + p) % 12 for p in range(4)]  # 12 samples per epoch, in order
        segs = [sample_segment_of(cfg.run.seed, it * 4 + p, 2, 1.0) for p in range(4)]
        tau = torch.tensor([t for t, _ in segs], dtype=torch.float64)
        assert torch.allclose(sigma_src.double(), warp(tau, 1.0), atol=1e-7)
        from trainer.rank_program import sample_noise

        eps = torch.stack([sample_noise(cfg.run.seed, it * 4 + p, SHAPE) for p in range(4)])
        x0 = torch.stack([torch.from_numpy(latent_of(i)) for i in index])
        s = sigma_src.reshape(4, 1, 1, 1)
        assert torch.allclose(x_src, (1 - s) * x0 + s * eps, atol=1e-6)
        lo = warp((tau - torch.tensor([l for _, l in segs], dtype=torch.float64)).clamp(min=0), 1.0)
        for k, sig in queries:  # one call per iteration: n_int x 4 queries, row i*4 + b belongs to sample b
            if k == it:
                sig = sig.double().view(-1, 4)
                assert torch.all(sig <= warp(tau, 1.0) + 1e-6) and torch.all(sig >= lo - 1e-6)
    after = fixed_loss()
    assert after < before, (before, after)


def test_data_based_needs_latent_shards(tmp_path):
    urls = write_latent_shards(tmp_path, with_latent=False)
    cfg = _cfg(str(tmp_path))
    with pytest.raises(ValueError, match="no 'latent' member"):
        next(_batches(cfg, urls))
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="distill.data_free"):
        load_config(recipe_path("dit"), ["data.shards="])  # the data-based recipe without its latent shards


def test_dit_recipe_trains_data_based_on_latent_shards_made_from_images(tmp_path):
    """The ImageNet recipe's rehearsal config end to end: PNG image shards with class ids -> `shard_latents`
    (the tiny model's SD-VAE-shaped AutoencoderKL, posterior samples x 0.18215) -> data-based pi-ID steps."""
    from data_pipeline.latents.shards import shard_latents
    from models.vae_encoder import load_image_encoder
    from tests.data_pipeline.test_latents import write_png_shards

    torch.manual_seed(0)
    urls = write_png_shards(tmp_path, n_shards=2, per=4)
    cfg = _cfg(str(tmp_path / "lat"), iters=3)
    reps = shard_latents(urls, str(tmp_path / "lat"), load_image_encoder(cfg), flip="random")
    assert sum(r.samples for r in reps) == 8
    fam = get_family("dit")
    teacher = fam.build_teacher(cfg)
    student = fam.build_student(cfg, teacher)
    labels = []

    def make_policy(x, s, c):
        labels.append(c["class_labels"].tolist())
        return student.make_policy(x, s, c)

    before = [p.detach().clone() for p in student.trainable_parameters()]
    steps = train_loop(cfg, build_engine(cfg, student), make_policy, teacher,
                       _batches(cfg, sorted(str(p) for p in (tmp_path / "lat").glob("*.tar"))), progress=False,
                       generator=torch.Generator().manual_seed(1))
    assert steps == 3 and labels[0] == [100, 101, 102, 103]  # the class ids of the images, in order
    assert any(not torch.equal(a, b) for a, b in zip(before, student.trainable_parameters()))


def test_toy2d_data_batches_draw_mixture_data_keyed_by_sample_index():
    """The in-process toy run's data-based batches: x0 from the toy mixture and the segment of each global
    sample index; a resume at step k yields the same x0 and segments as step k of a fresh run."""
    import itertools

    from models.families import get_family
    from models.families.toy2d import ToyMixture
    from trainer.config import config_from_dict
    from trainer.local_run import noise_batches

    cfg = config_from_dict({"model": {"family": "toy2d"}, "distill": {"data_free": False},
                            "train": {"batch_size": 8}, "run": {"seed": 3}})
    fam = get_family("toy2d")
    fresh = list(itertools.islice(noise_batches(cfg, fam, torch.Generator().manual_seed(0)), 3))
    _, cond, data = fresh[2]
    assert cond is None and data.x0.shape == (8, 2, 1, 1)
    assert [(float(t), float(s)) for t, s in zip(data.tau_src, data.segment)] == \
        [sample_segment_of(3, 16 + p, 4, 0.5) for p in range(8)]
    resumed = next(noise_batches(cfg, fam, torch.Generator().manual_seed(0), start_step=2))[2]
    assert torch.equal(resumed.x0, data.x0) and torch.equal(resumed.tau_src, data.tau_src)
    # the points are mixture samples: each lies near one of the mixture's centres
    mix = ToyMixture.default()
    d = torch.cdist(data.x0.reshape(8, 2), mix.centres.float()).min(1).values
    assert torch.all(d < 6 * mix.std)
