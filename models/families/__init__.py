"""Model families, chosen by `model.family` through ONE explicit mapping (`get_family`).

Each family is one file; `models/families/base.py` holds the interface. Imports are lazy so that choosing the
toy family never imports diffusers.
"""
from __future__ import annotations

from models.families.base import Family


def get_family(name: str) -> Family:
    """The family object for a `model.family` literal."""
    if name == "flux":
        from models.families.flux import FluxFamily

        return FluxFamily()
    if name == "qwen_image":
        from models.families.qwen_image import QwenImageFamily

        return QwenImageFamily()
    if name == "dit":
        from models.families.dit import DiTFamily

        return DiTFamily()
    if name == "toy2d":
        from models.families.toy2d import Toy2DFamily

        return Toy2DFamily()
    if name == "digits":
        from models.families.digits import DigitsFamily

        return DigitsFamily()
    raise ValueError(f"model.family: unknown family {name!r} (expected flux, qwen_image, dit, toy2d, digits)")


__all__ = ["Family", "get_family"]
