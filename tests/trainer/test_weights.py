"""Issue 21, item 7: a hub snapshot fetches only the files the family loads, after checking the cache's free
space. A test double of the Hub (tests/trainer/fake_hub.py, HTTP on 127.0.0.1, no network) serves a FLUX.1-dev-
shaped repository: a single-file checkpoint and autoencoder at the root beside the diffusers folders, an fp16
variant, text encoders, VAE. The resolving runs in a fresh process, as on a node (HF_ENDPOINT, HF_HUB_CACHE)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.fake_hub import FakeHub
from trainer.config import config_from_dict
from trainer.weights import hub_patterns

ROOT = Path(__file__).resolve().parents[2]
REPO = "black-forest-labs/FLUX.1-dev"
FILES = {  # contents differ per file (the cache stores each blob once)
    "model_index.json": b"{}", "README.md": b"# card", "flux1-dev.safetensors": b"s" * 64, "ae.safetensors": b"a" * 32,
    "scheduler/scheduler_config.json": b"{}",
    "transformer/config.json": b'{"_class_name": "FluxTransformer2DModel"}',
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": b"t" * 40,
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": b"u" * 40,
    "transformer/diffusion_pytorch_model.safetensors.index.json": b"{}",
    "transformer/diffusion_pytorch_model.fp16.safetensors": b"h" * 40,
    "text_encoder/config.json": b"{}", "text_encoder/model.safetensors": b"c" * 8,
    "text_encoder_2/config.json": b"{}", "text_encoder_2/model.safetensors": b"e" * 16,
    "tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b"", "tokenizer_2/spiece.model": b"m",
    "tokenizer_2/tokenizer_config.json": b"{}", "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": b"v" * 8, "vae/diffusion_pytorch_model.bin": b"p" * 8,
}
FILES = {name: name.encode() + b"\n" + data for name, data in FILES.items()}
TRANSFORMER = {"model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
               "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
               "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
               "transformer/diffusion_pytorch_model.safetensors.index.json"}
TEXT_VAE = {"text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer_2/spiece.model", "tokenizer_2/tokenizer_config.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors"}

RESOLVE = r"""
import json, sys
from trainer.config import config_from_dict
from trainer.weights import local_model_dir, with_local_weights
cfg = config_from_dict({"model": {"family": "flux", "pretrained": sys.argv[1]}, "run": {"scratch": sys.argv[2]}})
try:
    path = local_model_dir(cfg.model.pretrained, cfg, ("transformer",))
    print("RANK " + path)
    print("VALIDATION " + with_local_weights(cfg).model.pretrained)
except Exception as e:
    print("ERROR " + json.dumps([type(e).__name__, str(e)]))
"""


def resolve(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update({"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)})
    proc = subprocess.run([sys.executable, "-c", RESOLVE, REPO, str(tmp_path / "scratch")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in
                ("RANK", "VALIDATION", "ERROR"))


def files_under(path: str) -> set[str]:
    root = Path(path)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_patterns_name_the_consumers_folders():
    cfg = config_from_dict({"model": {"family": "flux", "subfolder": "transformer"}})
    assert hub_patterns(cfg, ("transformer",)) == ["model_index.json", "scheduler/*.json", "transformer/*.json",
                                                   "transformer/*.safetensors"]
    assert "vae/*.safetensors" in hub_patterns(cfg, ("vae",)) and "tokenizer*/*.model" in hub_patterns(cfg, ("text",))


@pytest.mark.timeout(300)
def test_a_rank_fetches_the_transformer_and_validation_the_encoders_never_the_root_checkpoint(tmp_path):
    with FakeHub(REPO, FILES) as hub:
        out = resolve(hub, tmp_path)
    assert "ERROR" not in out, out
    assert out["RANK"] == out["VALIDATION"]  # one snapshot dir per node, filled per consumer
    assert set(hub.downloads) == TRANSFORMER | TEXT_VAE  # each file once; the rank's part first
    assert set(hub.downloads[:len(TRANSFORMER)]) == TRANSFORMER
    assert files_under(out["RANK"]) == TRANSFORMER | TEXT_VAE
    for never in ("flux1-dev.safetensors", "ae.safetensors", "README.md", "vae/diffusion_pytorch_model.bin",
                  "transformer/diffusion_pytorch_model.fp16.safetensors"):
        assert never not in hub.downloads


@pytest.mark.timeout(300)
def test_too_little_cache_space_is_one_line_before_any_download(tmp_path):
    big = {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors": 10 ** 15}  # listed as 1 PB
    with FakeHub(REPO, FILES, claimed_sizes=big) as hub:
        out = resolve(hub, tmp_path)
    kind, message = json.loads(out["ERROR"])
    assert kind == "ScratchSpaceError" and "\n" not in message
    assert f"model.pretrained='{REPO}': downloading 6 files (transformer) needs" in message
    assert str(tmp_path / "cache") in message and "HF_HUB_CACHE" in message
    assert hub.downloads == []  # not one file fetched
