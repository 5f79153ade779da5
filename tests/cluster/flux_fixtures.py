"""Tiny FLUX configs and a saved teacher shared by the cluster tests."""
from __future__ import annotations

from pathlib import Path

COND_SHAPES = {"prompt_embeds": [5, 32], "pooled_prompt_embeds": [32]}


def save_tiny_teacher(root: Path) -> str:
    from models.families import get_family
    from tests.trainer.engine_workers import flux_cfg
    from trainer.config import config_from_dict

    net = get_family("flux").load_network(config_from_dict(flux_cfg(1, "")))
    net.save_pretrained(root / "transformer")
    return str(root)
