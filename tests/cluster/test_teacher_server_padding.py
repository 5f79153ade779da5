"""TeacherServer batching of conditioning from different ranks (issue 13): Qwen-Image prompt embeddings of
different lengths (each rank pads only to its own longest prompt) are right-padded to the batch's longest with
their masks when the server concatenates the requests, and each rank gets the velocity its prompts alone give.
The server object runs its real async request path (velocity -> batcher -> forward thread), without Ray."""
from __future__ import annotations

import asyncio

import torch

from tests.recipes import FP32, recipe_config


def _cond(rows: int, length: int, valid: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    emb = torch.randn(rows, length, 32, generator=g) * mask[..., None]
    neg_mask = torch.ones(rows, 2, dtype=torch.long)
    return {"prompt_embeds": emb, "prompt_embeds_mask": mask,
            "negative_prompt_embeds": torch.randn(rows, 2, 32, generator=g), "negative_prompt_embeds_mask": neg_mask}


def test_requests_with_prompts_of_different_lengths_share_one_forward():
    from cluster.teacher_server import TeacherServer

    cfg = recipe_config("qwen_image", *FP32)  # the recipe's tiny same-family model, in float32 for the comparison
    C, S = cfg.model.latent_channels, cfg.model.latent_size
    grad = torch.is_grad_enabled()
    try:
        server = TeacherServer(cfg.to_dict(), batch_wait_ms=200.0)
    finally:
        torch.set_grad_enabled(grad)  # the actor turns autograd off for its process; restore this one's
    ranks = [_cond(2, 3, [3, 2], seed=1), _cond(2, 6, [6, 4], seed=2)]  # rank 0 pads to 3 tokens, rank 1 to 6
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, C, S, S, generator=g) for _ in ranks]  # 2 query states x 2 rows per rank
    sigmas = [torch.tensor([0.9, 0.3, 0.6, 0.2]), torch.tensor([0.5, 0.8, 0.1, 0.7])]
    for r, c in enumerate(ranks):
        server.put_cond(f"rank{r}", c)

    async def both():
        return await asyncio.gather(*(server.velocity(xs[r], sigmas[r], f"rank{r}", repeat=2) for r in range(2)))

    together = asyncio.run(both())
    assert server.stats()["batches"] == 1  # one forward for both ranks' requests
    alone = [server.teacher(xs[r], sigmas[r], {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in c.items()})
             for r, c in enumerate(ranks)]
    for u, ref in zip(together, alone):
        assert u.shape == (4, C, S, S) and bool(torch.isfinite(u).all())
        torch.testing.assert_close(u, ref, rtol=1e-4, atol=1e-5)
