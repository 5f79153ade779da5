"""Model families, chosen by `model.family` through ONE explicit mapping (`FAMILIES`).

Each family is one file; `models/families/base.py` holds the interface. Imports are lazy so that choosing the
toy family never imports diffusers. Adding a family is one line here: `"name": "module:Class"`.
"""
from __future__ import annotations

import importlib

from typing import Callable

from models.families.base import Family
from models.types import Cond, Config

FAMILIES: dict[str, str] = {
    "flux": "models.families.flux:FluxFamily",
    "qwen_image": "models.families.qwen_image:QwenImageFamily",
    "dit": "models.families.dit:DiTFamily",
    "toy2d": "models.families.toy2d:Toy2DFamily",
    "digits": "models.families.digits:DigitsFamily",
    "wan": "models.families.wan:WanFamily",
}


def get_family(name: str) -> Family:
    """The family object for a `model.family` literal."""
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r} (expected one of {', '.join(FAMILIES)})")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def load_text_encoder(cfg: Config) -> Callable[[list[str]], Cond]:
    """The prompt encoder of `cfg.model.family` (`Family.load_text_encoder`), loaded once; call it with a list of
    prompts."""
    return get_family(cfg.model.family).load_text_encoder(cfg)


__all__ = ["FAMILIES", "Family", "get_family", "load_text_encoder"]
