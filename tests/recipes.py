"""The production recipes as the suite uses them (issue 21: the hand-written `*_tiny.yaml` twins are gone): the
rehearsal's shrunk config of the real recipe (trainer/rehearsal/shrink.py), its tiny same-family model written
once per process into a hub cache (trainer/rehearsal/snapshot.py) and resolved to a local directory by the real
loader (trainer/weights.py, offline). Unit tests that check something else add overrides on top (e.g.
`train.engine=torch` for speed); the rehearsal tests use the recipe plus the shrink only."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from trainer.config import Config, load_config
from trainer.rehearsal.shrink import Context, Machine, shrink, shrink_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"flux": "configs/flux_dev_gm_k8_4nfe.yaml", "qwen_image": "configs/qwen_image_gm_k8_4nfe.yaml",
           "dit": "configs/dit_imagenet_gm_k32_1nfe.yaml", "wan": "configs/wan_t2v_14b_gm_k8_4nfe.yaml"}
MACHINE = Machine(cpus=2)  # this project's CPU machine: the shrink is the same wherever the suite runs
_ROOT: list[str] = []
_DIRS: dict[str, str] = {}


def _scratch() -> Path:
    if not _ROOT:
        _ROOT.append(tempfile.mkdtemp(prefix="piflow-recipes-"))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return Path(_ROOT[0])


def recipe_path(family: str) -> Path:
    return ROOT / RECIPES[family]


def tiny_model_dir(family: str) -> str:
    """The tiny same-family model of the recipe, as the directory its model.pretrained resolves to: for a hub
    id, the snapshot in a hub cache resolved by trainer/weights.py with HF_HUB_OFFLINE=1."""
    if family in _DIRS:
        return _DIRS[family]
    from trainer.rehearsal.snapshot import write_hub_snapshot, write_model_dir
    from trainer.weights import is_hub_id, resolve_hub_id

    base = shrink(recipe_path(family), Context(MACHINE, 6, str(_scratch() / "unused"),
                                               pretrained_dir=str(_scratch() / family)))[1]
    if not is_hub_id(base.model.pretrained):
        _DIRS[family] = str(write_model_dir(base, base.model.pretrained))
        return _DIRS[family]
    cache = _scratch() / "hub"
    write_hub_snapshot(base, cache)
    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    try:
        _DIRS[family] = resolve_hub_id(base.model.pretrained, base)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return _DIRS[family]


def recipe_config(family: str, *overrides: str, output: str = "") -> Config:
    """The rehearsal config of the family's production recipe with its tiny model on disk, then `overrides`.
    Without shards unless `data.shards=...` is given: data-free with random conditioning (the data-based DiT
    recipe then runs data-free, as its old twin did, unless the overrides give latent shards). wandb is off
    (the suite's tests never reach it; the rehearsal tests run offline)."""
    return load_config(recipe_path(family), recipe_overrides(family, *overrides, output=output))


def recipe_overrides(family: str, *overrides: str, output: str = "") -> list[str]:
    """`recipe_config` as `key=value` overrides of the recipe file (for commands run on the real recipe path)."""
    ctx = Context(MACHINE, 6, output or str(_scratch() / "runs" / family), pretrained_dir=tiny_model_dir(family))
    no_data = ["data.shards=", "distill.data_free=true", "wandb.mode=disabled"]
    return [*shrink_overrides(load_config(recipe_path(family)), ctx), f"model.pretrained={tiny_model_dir(family)}",
            *no_data, *overrides]


def recipe_dict(family: str, *overrides: str, output: str = "") -> dict:
    """`recipe_config(...).to_dict()`, for tests that edit the tree as a dict."""
    return recipe_config(family, *overrides, output=output).to_dict()


# overrides for unit tests that test something else than the engine or the numerics
IN_PROCESS = ("train.engine=torch", "cluster.student.workers=1")  # one process, no ZeRO
FP32 = ("train.precision=fp32", "model.dtype=float32", "model.text_dtype=float32")  # exact float32 comparisons


def recipe_yaml(family: str, path: str | Path, *overrides: str, output: str = "") -> str:
    """`recipe_config(...)` written as a YAML file at `path`, for commands that take `--config FILE`."""
    from trainer.config import dump_config

    Path(path).write_text(dump_config(recipe_config(family, *overrides, output=output)))
    return str(path)
