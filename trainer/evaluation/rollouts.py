"""Validation rollouts (DESIGN.md §6): every `eval.every` steps the EMA student samples fixed validation
prompts from fixed seeds at `eval.nfe` steps; the result goes to `rollouts/step_N/` under `run.output`:

    latents.tar     a webdataset shard, one sample per rollout: `{key}.states.npy` (nfe+1, C, H, W) float32
                    (the state after each step, the noise first), `{key}.final.npy` (C, H, W), `{key}.json`
                    (prompt, seed)
    preview.png     a grid of the decoded samples (VAE when given; latent channels otherwise; a scatter plot
                    for 2-D toy points)
    metrics.json    step, sampler settings, per-step policy statistics, statistics of the final latents

and to the metrics logger (numbers, plus the preview as an image: wandb through trainer/metrics.py).

Sample i always uses noise from seed `eval.seed + i` and prompt `eval.prompts[i % len]`, whatever
`num_samples`, so rollouts of different steps (and the exported pipeline with the same seed) are comparable.
The hook runs inside `ema.applied()` (the loop does that) on every rank (ZeRO-3 forwards are collective);
only rank 0 writes.
"""
from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from data_pipeline import storage
from trainer.config import Config

log = logging.getLogger(__name__)


def rollout_url(run_output: str, step: int) -> str:
    return storage.join(run_output, "rollouts", f"step_{step:08d}")


def validation_noise(cfg: Config, shape: tuple[int, int, int], num: Optional[int] = None) -> torch.Tensor:
    """(N, C, H, W) float32: sample i from its own generator seeded `eval.seed + i`."""
    n = cfg.eval.num_samples if num is None else num
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(cfg.eval.seed + i))
                        for i in range(n)])


def validation_prompts(cfg: Config) -> list[str]:
    prompts = cfg.eval.prompts
    return [prompts[i % len(prompts)] for i in range(cfg.eval.num_samples)] if prompts else []


def policy_stats(policy) -> dict[str, float]:
    """GM: mean u-space log-std, mean largest weight, mean weight entropy (nats); DX: x0-grid spread."""
    if hasattr(policy, "logweights"):
        logw = policy.logweights.detach().float()  # (B, K, 1, H, W), log-softmaxed
        w = logw.exp()
        return {"logstd_mean": float(policy.logstd.detach().float().mean()),
                "weight_max_mean": float(w.amax(dim=1).mean()),
                "weight_entropy_mean": float(-(w * logw).sum(dim=1).mean())}
    if hasattr(policy, "x0_grid"):
        return {"x0_grid_std": float(policy.x0_grid.detach().float().std(dim=1).mean())}
    return {}


# ------------------------------------------------------------------------------------------ artifacts
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def latents_shard(states: torch.Tensor, prompts: list[str], seeds: list[int]) -> bytes:
    """A webdataset tar: per sample `{key}.states.npy`, `{key}.final.npy`, `{key}.json`. states (N, S, C, H, W)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(states.shape[0]):
            key = f"sample_{i:05d}"
            meta = {"prompt": prompts[i] if prompts else None, "seed": seeds[i]}
            members = {"states.npy": _npy(states[i].numpy()), "final.npy": _npy(states[i, -1].numpy()),
                       "json": json.dumps(meta).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0  # fixed mtime: identical rollouts give identical shards
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _to_uint8_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """images (N, 3 or 1, H, W) in [-1, 1] -> (rows*H, columns*W, 3) uint8 grid."""
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    rows = math.ceil(n / columns)
    grid = torch.full((3, rows * h, columns * w), -1.0)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i, :3]
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def latents_as_images(x: torch.Tensor) -> torch.Tensor:
    """Without a VAE: the first three latent channels (or one, grey), each scaled by the batch's 3-sigma range."""
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    scale = 3 * x.float().std().clamp(min=1e-6)
    return (x.float() - x.float().mean()) / scale


def preview_png(x0: torch.Tensor, images: Optional[torch.Tensor] = None) -> bytes:
    """A PNG of the final samples: `images` (N,3,H,W) in [-1,1] when decoded (clips (N,3,F,H,W): their middle
    frames); for 1x1 latents with two channels (2-D toy points) a scatter plot; otherwise the latent channels."""
    from PIL import Image

    if images is not None and images.dim() == 5:
        images = images[:, :, images.shape[2] // 2]

    if images is None and x0.shape[-2:] == (1, 1) and x0.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        pts = x0.reshape(x0.shape[0], 2).numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2)
        ax.set_aspect("equal")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()
    images = latents_as_images(x0) if images is None else images
    grid = _to_uint8_grid(images, columns=min(8, images.shape[0]))
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def animation(video: torch.Tensor, fmt: str = "GIF", fps: float = 16.0) -> bytes:
    """An animated GIF / WebP / PNG of decoded clips: video (N, 3, F, H, W) in [-1, 1], one grid per frame."""
    from PIL import Image

    frames = [Image.fromarray(_to_uint8_grid(video[:, :, f].float(), columns=min(8, video.shape[0])))
              for f in range(video.shape[2])]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ upload
class RolloutUploader:
    """Writes rollout files on a background thread (issue 12): training never waits for, nor dies of, a
    rollout upload. A write that still fails after `storage`'s own retries is tried `attempts` times with
    backoff, then given up with a warning (`failures` counts them); a rollout that finds the queue full is
    dropped with a warning (`dropped`) rather than stalling training behind a slow store."""

    def __init__(self, queue_size: int = 2, attempts: int = 3, backoff_s: float = 2.0):
        import queue
        import threading

        self.attempts, self.backoff_s = attempts, backoff_s
        self.failures = self.dropped = 0
        self._queue: "queue.Queue[Optional[tuple[int, list[tuple[str, bytes]]]]]" = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="rollout-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, files: list[tuple[str, bytes]]) -> None:
        import queue

        try:
            self._queue.put_nowait((step, files))
        except queue.Full:
            self.dropped += 1
            log.warning("rollout of step %d dropped: %d earlier rollouts are still uploading", step,
                        self._queue.maxsize)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(*job)
            finally:
                self._queue.task_done()

    def _write(self, step: int, files: list[tuple[str, bytes]]) -> None:
        for url, data in files:
            for i in range(self.attempts):
                try:
                    storage.put_bytes(url, data)
                    break
                except Exception as e:  # noqa: BLE001 - a rollout is never worth the run
                    if i == self.attempts - 1:
                        self.failures += 1
                        log.warning("rollout of step %d not uploaded (%s: %s); training goes on", step,
                                    type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                        return  # the rest of this rollout too: metrics.json must not name missing files
                    time.sleep(self.backoff_s * (2 ** i))

    def close(self) -> None:
        """Wait for the queued uploads, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


# ------------------------------------------------------------------------------------------------- hook
class RolloutHook:
    """`hook(step) -> dict[str, float]`: sample, write `rollouts/step_N/` (rank 0), log the preview image.

    `encode(prompts) -> cond` encodes the validation prompts once (None for families without prompts);
    `decode(x0) -> images (N,3,H,W) in [-1,1]` renders the preview (None: latents/scatter)."""

    def __init__(self, cfg: Config, family, student: torch.nn.Module, rank: int = 0, logger=None,
                 encode: Optional[Callable[[list[str]], Any]] = None,
                 decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 device: Optional[torch.device] = None, uploader: Optional["RolloutUploader"] = None):
        if decode is None and not getattr(family, "uses_vae", True):  # the latents are the images (digits)
            decode = lambda x0: family.decode(None, x0, cfg=cfg)  # noqa: E731
        self.cfg, self.student, self.rank, self.logger, self.decode = cfg, student, rank, logger, decode
        self.prompts = validation_prompts(cfg)
        if encode is not None and not self.prompts:
            raise ValueError("eval.prompts: the family needs prompts for validation rollouts (got an empty list)")
        # made once on the student's device (noise drawn on the CPU: the same numbers on any device)
        self.device = device if device is not None else next(student.parameters()).device
        cond = encode(self.prompts) if encode is not None else None
        self.cond = None if cond is None else {k: v.to(self.device) for k, v in cond.items()}
        self.noise = validation_noise(cfg, tuple(family.latent_shape(cfg))).to(self.device)  # (N, C, H, W)
        self.seeds = [cfg.eval.seed + i for i in range(cfg.eval.num_samples)]
        self.uploader = uploader if uploader is not None or rank != 0 else RolloutUploader()

    def sample(self) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """-> (states (N, nfe+1, C, H, W) float32 with the noise first and x0 last, per-step policy stats)."""
        from models.sampling import sample

        stats: list[dict[str, float]] = []

        def make_policy(x, sigma):
            policy = self.student.make_policy(x, sigma, self.cond)
            stats.append(policy_stats(policy))
            return policy

        d, e = self.cfg.distill, self.cfg.eval
        temperature = "auto" if e.temperature == "auto" else 1.0
        was_training = self.student.training
        self.student.eval()
        try:
            _, trajectory = sample(make_policy, self.noise, e.nfe, d.final_step_scale, d.shift, d.total_substeps,
                                   temperature=temperature, return_trajectory=True)
        finally:
            self.student.train(was_training)
        return torch.stack([t.float().cpu() for t in trajectory], dim=1), stats

    def __call__(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        states, stats = self.sample()
        x0 = states[:, -1]
        metrics: dict[str, float] = {"rollout/x0_mean": float(x0.mean()), "rollout/x0_std": float(x0.std())}
        for k, s in enumerate(stats):
            metrics.update({f"rollout/step{k}/{name}": v for name, v in s.items()})
        if self.rank != 0:
            return metrics
        images = self.decode(x0) if self.decode is not None else None  # None: no VAE, latent channels shown
        png = preview_png(x0, images)
        url = rollout_url(self.cfg.run.output, step)
        record = {"step": step, "nfe": self.cfg.eval.nfe, "temperature": self.cfg.eval.temperature,
                  "num_samples": int(x0.shape[0]), "seeds": self.seeds, "prompts": self.prompts,
                  "policy": stats, "metrics": metrics, "seconds": time.perf_counter() - t0}
        # metrics.json last: a rollout dir with it is complete
        self.uploader.submit(step, [(storage.join(url, "latents.tar"), latents_shard(states, self.prompts, self.seeds)),
                                    (storage.join(url, "preview.png"), png),
                                    (storage.join(url, "metrics.json"), json.dumps(record, indent=1).encode())])
        if self.logger is not None:
            self.logger.log_image(step, "rollout/preview", png)
            if images is not None:  # one image per sample, captioned with its prompt (or seed)
                captions = [f"{self.prompts[i]} (seed {s})" if self.prompts else f"seed {s}"
                            for i, s in enumerate(self.seeds)]
                self.logger.log_images(step, "rollout/samples", [preview_png(x0[i:i + 1], images[i:i + 1])
                                                                 for i in range(images.shape[0])], captions)
        metrics["rollout/seconds"] = time.perf_counter() - t0
        metrics["rollout/upload_failures"] = float(self.uploader.failures + self.uploader.dropped)
        return metrics

    def close(self) -> None:
        """Finish the queued rollout uploads (call at the end of the run)."""
        if self.uploader is not None:
            self.uploader.close()


def chain_hooks(*hooks: Optional[Callable[[int], dict]]) -> Callable[[int], dict]:
    """One eval hook that runs several (None entries skipped) and merges their metrics."""
    active = [h for h in hooks if h is not None]

    def run(step: int) -> dict:
        out: dict = {}
        for hook in active:
            out.update(hook(step))
        return out

    return run
