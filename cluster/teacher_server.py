"""The frozen teacher as a Ray actor (`teacher.placement: separate`, DESIGN.md §4).

`TeacherServer` holds one frozen teacher replica (bf16 on a GPU per `model.dtype`; fp32 is fine on CPU) and
serves `velocity` requests from every student rank. Requests that arrive together are concatenated into one
forward (dynamic batching, up to `teacher.max_batch` samples, waiting at most `teacher.batch_wait_ms` for
company), run on one worker thread while the actor keeps accepting requests. Prompt embeddings cross the
network once per batch: a rank `put_cond`s them under a key, later requests name the key and how many times
each row repeats. `stats()` reports queue length, request/batch counts and latency.

`RemoteTeacher` is the student rank's client: `submit(x, sigma, cond) -> future` for the overlapped iteration
and `teacher(x, sigma, cond) -> u` for the sequential one. It is the only piece of Ray the trainer sees, and
it is passed in as a plain object (the trainer never imports ray).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import time
import uuid
from typing import Any, Optional

import torch

from cluster.validation import ValidationServer


def _cat_cond(family, conds: list[dict]) -> dict:
    """The conditioning of requests from several ranks as one batch: the family concatenates (and pads
    sequences of different lengths to the longest, with their masks: Qwen-Image prompts)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys:
            raise ValueError(f"teacher requests in one batch carry different conditioning keys: "
                             f"{sorted(keys)} vs {sorted(c.keys())}")
    return family.cat_cond(conds)


def _repeat(cond: Optional[dict], n: int) -> Optional[dict]:
    if cond is None or n == 1:
        return cond
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cond.items()}


class TeacherServer(ValidationServer):
    """The actor class (wrapped with `ray.remote` by the orchestrator, which sets its resources). Replica 0 also
    encodes the validation prompts and decodes validation latents (`ValidationServer`, cluster/validation.py)."""

    def __init__(self, cfg_dict: dict, max_batch: int = 256, batch_wait_ms: float = 2.0, cond_cache: int = 64,
                 device: Optional[str] = None):
        torch.set_grad_enabled(False)
        super().__init__(cfg_dict, device)  # Ray sets CUDA_VISIBLE_DEVICES per actor: "cuda" is this replica's
        family = self.family
        self.teacher = family.build_teacher(self.cfg)  # frozen, eval, dtype = model.dtype
        self.teacher.to(self.device)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._conds: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
        self._cond_cache = cond_cache
        self._queue: list[tuple] = []  # (x, sigma, cond, future, t_arrival)
        self._batcher: Optional[asyncio.Task] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one forward at a time
        self._n = collections.Counter()
        self._latency_sum = 0.0
        self._compute_sum = 0.0

    # ---------------------------------------------------------------------------------- conditioning cache
    def put_cond(self, key: str, cond: Optional[dict]) -> None:
        """Cache a batch's prompt embeddings under `key` (the oldest are dropped beyond the cache size)."""
        self._conds[key] = None if cond is None else {k: v.to(self.device) for k, v in cond.items()}
        self._conds.move_to_end(key)
        while len(self._conds) > self._cond_cache:
            self._conds.popitem(last=False)
        self._n["cond_puts"] += 1

    # ---------------------------------------------------------------------------------------- requests
    async def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond_key: str, repeat: int = 1) -> torch.Tensor:
        """u_teacher (N,C,H,W) float32 at x (N,C,H,W), sigma (N,); cond rows = the cached batch's, repeated
        `repeat` times (N = repeat * B)."""
        if cond_key not in self._conds:
            raise KeyError(f"TeacherServer: unknown conditioning key {cond_key!r} (put_cond it first; the cache "
                           f"holds the last {self._cond_cache} batches)")
        cond = _repeat(self._conds[cond_key], repeat)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((x, sigma, cond, future, time.perf_counter()))
        self._n["requests"] += 1
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.batch_wait_s)  # let concurrent requests from other ranks join
        while self._queue:
            batch, size = [], 0
            while self._queue and (not batch or size + self._queue[0][0].shape[0] <= self.max_batch):
                item = self._queue.pop(0)
                batch.append(item)
                size += item[0].shape[0]
            try:
                outs = await loop.run_in_executor(self._pool, self._forward, batch)
            except Exception as exc:  # every waiting request sees the failure
                for *_, fut, _t in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            now = time.perf_counter()
            for (_x, _s, _c, fut, t_arrival), u in zip(batch, outs):
                self._latency_sum += now - t_arrival
                if not fut.done():
                    fut.set_result(u)

    def _forward(self, batch: list[tuple]) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        x = torch.cat([b[0] for b in batch]).to(self.device)
        sigma = torch.cat([b[1] for b in batch]).to(self.device)
        conds = [b[2] for b in batch]
        cond = None if conds[0] is None else _cat_cond(self.family, conds)
        u = self.teacher(x, sigma, cond).float().cpu()  # (N_total, C, H, W)
        self._compute_sum += time.perf_counter() - t0
        self._n["batches"] += 1
        self._n["samples"] += x.shape[0]
        return list(u.split([b[0].shape[0] for b in batch]))

    async def encode(self, prompts: list[str]):  # on the forward thread: never beside a teacher forward
        return await asyncio.get_running_loop().run_in_executor(self._pool, super().encode, prompts)

    async def decode(self, x0: torch.Tensor):
        return await asyncio.get_running_loop().run_in_executor(self._pool, super().decode, x0)

    def stats(self) -> dict[str, float]:
        """Queue length (requests waiting), counts and mean latency (arrival -> result) / compute per batch."""
        n = self._n
        return {
            "queue_len": len(self._queue),
            "requests": n["requests"],
            "batches": n["batches"],
            "samples": n["samples"],
            "cond_puts": n["cond_puts"],
            "mean_batch_requests": n["requests"] / max(n["batches"], 1),
            "mean_latency_s": self._latency_sum / max(n["requests"], 1),
            "mean_compute_s": self._compute_sum / max(n["batches"], 1),
        }

    def ping(self) -> bool:
        return True


RESTART_WAIT_S = 900.0  # how long a client waits for a restarting replica (it reloads the teacher)


class RemoteTeacher:
    """A student rank's handle on the TeacherServer replicas (round-robin per request)."""

    def __init__(self, servers: list, rank: int = 0, timeout_s: float = 0.0):
        if not servers:
            raise ValueError("RemoteTeacher needs at least one TeacherServer handle")
        self.servers = servers
        self._turn = itertools.cycle(range(len(servers)))
        for _ in range(rank % len(servers)):  # spread ranks over replicas
            next(self._turn)
        self._prefix = f"{uuid.uuid4().hex[:8]}-"
        self._count = 0
        self._last_cond: Any = None
        self._keys: dict[int, str] = {}  # server index -> key of the current batch's conditioning there
        self.timeout_s = timeout_s  # issue 12: a request unanswered this long restarts its replica (0 = never)

    def _cond_key(self, server_index: int, cond: Optional[dict], kill_on_timeout: bool = True) -> str:
        import ray

        if cond is not self._last_cond:  # a new batch: its embeddings go out once (per replica)
            self._last_cond, self._keys = cond, {}
            self._count += 1
        if server_index not in self._keys:
            key = f"{self._prefix}{self._count}"
            cpu = None if cond is None else {k: v.detach().cpu() for k, v in cond.items()}  # transport on the host
            try:
                ray.get(self.servers[server_index].put_cond.remote(key, cpu), timeout=self.timeout_s or None)
            except ray.exceptions.GetTimeoutError:  # hung replica: restart it; the caller's retry resends
                if kill_on_timeout:
                    ray.kill(self.servers[server_index], no_restart=False)
                raise ray.exceptions.ActorUnavailableError(
                    f"teacher replica {server_index}: put_cond unanswered in {self.timeout_s:g} s", None) from None
            self._keys[server_index] = key
        return self._keys[server_index]

    def submit(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict]) -> "_RayFuture":
        """x (N,C,H,W), sigma (N,); cond with B rows, N a multiple of B (rows repeat N / B times)."""
        i = next(self._turn)
        rows = x.shape[0] if cond is None else next(iter(cond.values())).shape[0]
        if x.shape[0] % rows:
            raise ValueError(f"teacher request of {x.shape[0]} samples is not a multiple of the {rows} cond rows")
        x_cpu, sigma_cpu = x.detach().float().cpu(), sigma.detach().float().cpu()

        def send(resend: bool = False):
            from ray.exceptions import ActorUnavailableError, RayActorError

            attempt, waiting, restarting_until = 0, False, time.monotonic() + RESTART_WAIT_S
            while True:
                if resend or attempt:  # issue 7: replica i died; Ray restarted it (teacher.max_restarts) with
                    self._keys.pop(i, None)  # an empty conditioning cache: the embeddings go out again first
                try:
                    key = self._cond_key(i, cond, kill_on_timeout=not (resend or waiting))
                    break
                except ActorUnavailableError:  # issue 12: restarting (reloads the teacher): wait for it
                    waiting = True
                    if time.monotonic() > restarting_until:
                        raise
                    time.sleep(0.2)
                except RayActorError:  # it died during put_cond: the next put waits for the restart
                    attempt += 1
                    if attempt > _RayFuture.MAX_RETRIES:
                        raise
            return self.servers[i].velocity.remote(x_cpu, sigma_cpu, key, x.shape[0] // rows)

        def restart() -> None:
            import ray

            ray.kill(self.servers[i], no_restart=False)

        return _RayFuture(send(), x.device, lambda: send(resend=True), f"teacher replica {i}",
                          timeout_s=self.timeout_s, restart=restart)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Optional[dict]) -> torch.Tensor:
        return self.submit(x, sigma, cond).result()

    def stats(self) -> list[dict]:
        import ray

        return ray.get([s.stats.remote() for s in self.servers])


class _RayFuture:
    """A pending teacher request. If its replica dies (issue 7), the request is sent again, to the same
    replica once Ray has restarted it: the teacher is frozen, so the retried velocity is the same."""

    MAX_RETRIES = 5

    def __init__(self, ref, device: torch.device, resend=None, where: str = "teacher", timeout_s: float = 0.0,
                 restart=None):
        self.ref, self.device, self.resend, self.where = ref, device, resend, where
        self.timeout_s, self.restart = timeout_s, restart

    def result(self) -> torch.Tensor:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        hung = 0
        for attempt in range(self.MAX_RETRIES + 1):
            try:
                try:
                    return ray.get(self.ref, timeout=self.timeout_s or None).to(self.device)
                except GetTimeoutError:
                    # issue 12: a hung replica is restarted and the request retried once
                    hung += 1
                    if hung > 1 or self.restart is None or self.resend is None:
                        raise RuntimeError(f"{self.where}: no answer in {self.timeout_s:g} s (teacher.timeout_s), "
                                           f"{hung} time(s), after a restart of the replica") from None
                    self.restart()
                    self.ref = self.resend()
                    continue
            except (RayActorError, KeyError) as e:
                # KeyError: a request queued for the restarting replica named a key its new cache lacks
                lost_cond = isinstance(e, KeyError) and "unknown conditioning key" in str(e)
                if self.resend is None or not (isinstance(e, RayActorError) or lost_cond):
                    raise
                if attempt == self.MAX_RETRIES:
                    raise RuntimeError(f"{self.where}: request failed {attempt + 1} times (the replica keeps "
                                       f"dying; teacher.max_restarts may be used up): {e}") from e
                try:
                    self.ref = self.resend()
                except RayActorError as e2:  # put_cond on a replica that is dead for good
                    raise RuntimeError(f"{self.where} is gone and was not restarted: {e2}") from e
        raise AssertionError("unreachable")
