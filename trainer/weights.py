"""Where the teacher's weights come from: `model.pretrained` is a local or `s3://` diffusers-format directory, or
a hub id. The project's only huggingface_hub user.

A hub id is resolved on each node into that node's own cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`<run.scratch>/huggingface/hub` (node-local; never shared), with `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`
from the environment (read when called). A file lock in the cache makes the ranks of one node download once.

Issue 21: only the files a consumer loads are fetched (`PARTS`: a student rank the transformer, the data
workers the text encoders, the validation actor text encoders and VAE), never a repository's other files
(FLUX.1-dev also holds a 24 GB single-file checkpoint at its root); and the free space of the cache (or of
run.scratch for an s3:// model dir) is checked against what is about to be downloaded first, with one line.
"""
from __future__ import annotations

import os
import re

from data_pipeline import storage
from trainer.config import Config, ConfigError
from trainer.scratch import ScratchSpaceError, ensure_free

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(ref: str) -> bool:
    """`org/name` that is not an existing local path (diffusers' own rule for from_pretrained)."""
    return bool(ref) and "://" not in ref and not os.path.exists(ref) and _HUB_ID.match(ref) is not None


def hub_cache_dir(cfg: Config) -> str:
    from trainer.scratch import scratch_root

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return os.path.join(scratch_root(cfg), "huggingface", "hub")


# What each consumer of a diffusers-format model loads (safetensors weights, configs, tokenizer files); the
# transformer's own folder is `model.subfolder`. Nothing at the repository root but model_index.json.
_TOKENIZER = ("*.json", "*.txt", "*.model", "*.tiktoken")
PARTS = {
    "transformer": ("{sub}*.json", "{sub}*.safetensors"),
    "text": ("text_encoder*/*.json", "text_encoder*/*.safetensors", *(f"tokenizer*/{p}" for p in _TOKENIZER)),
    "vae": ("vae/*.json", "vae/*.safetensors"),
}
ALL_PARTS = tuple(PARTS)
_ALWAYS = ("model_index.json", "scheduler/*.json")
_IGNORE = ("*.fp16.*", "*.fp16-*", "*.index.fp16.json")  # dtype variants diffusers loads only when asked to


def hub_patterns(cfg: Config, parts: tuple[str, ...] = ALL_PARTS) -> list[str]:
    """allow_patterns of the files `parts` of `cfg.model.family`'s diffusers layout load."""
    sub = f"{cfg.model.subfolder.strip('/')}/" if cfg.model.subfolder else ""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown weight parts {sorted(unknown)} (one of {', '.join(PARTS)})")
    return [*_ALWAYS, *(p.format(sub=sub) for part in parts for p in PARTS[part])]


def _offline() -> bool:
    # read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at its import
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _lock(cache: str, repo_id: str):
    from filelock import FileLock

    os.makedirs(cache, exist_ok=True)
    return FileLock(os.path.join(cache, f".piflow-{repo_id.replace('/', '--')}.lock"))


def _fail(repo_id: str, cache: str, e: BaseException) -> ConfigError:
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    offline = " (HF_HUB_OFFLINE is set: only the cache is searched)" if _offline() else ""
    return ConfigError(f"model.pretrained={repo_id!r}: the hub id does not resolve into the cache {cache}{offline} "
                       f"({type(e).__name__}: {cause}); check the id, HF_TOKEN for gated models, or put the model "
                       f"in that cache / point model.pretrained at a directory")


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None  # read at call time, as HF_HUB_OFFLINE


def resolve_hub_id(repo_id: str, cfg: Config, parts: tuple[str, ...] = ALL_PARTS) -> str:
    """The local snapshot dir of `repo_id` in this node's cache holding the files `parts` load (downloaded once
    per node, under a lock, after a free-space check)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir(cfg)
    patterns = hub_patterns(cfg, parts)
    with _lock(cache, repo_id):
        try:
            if not _offline():
                planned = snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns,
                                            ignore_patterns=list(_IGNORE), endpoint=_endpoint(), dry_run=True)
                need = sum(f.file_size or 0 for f in planned if f.will_download)
                ensure_free(cache, need, f"model.pretrained={repo_id!r}: downloading "
                            f"{sum(1 for f in planned if f.will_download)} files ({', '.join(parts)})",
                            "set HF_HUB_CACHE (or HF_HOME, or run.scratch) to a larger node-local disk")
            return snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns, ignore_patterns=list(_IGNORE),
                                     local_files_only=_offline(), endpoint=_endpoint())
        except ScratchSpaceError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the id and the cache
            raise _fail(repo_id, cache, e) from None


def resolve_config_file(cfg: Config) -> str:
    """The teacher transformer's config.json: a local path / URL under model.pretrained, or the hub file (only
    that file is fetched into this node's cache)."""
    ref, sub = cfg.model.pretrained, cfg.model.subfolder
    if is_hub_id(ref):
        from huggingface_hub import hf_hub_download

        cache = hub_cache_dir(cfg)
        with _lock(cache, ref):
            try:
                return hf_hub_download(ref, "config.json", subfolder=sub or None, cache_dir=cache,
                                       local_files_only=_offline(), endpoint=_endpoint())
            except Exception as e:  # noqa: BLE001
                raise _fail(ref, cache, e) from None
    return storage.join(ref, *([sub] if sub else []), "config.json")


def local_model_dir(ref: str, cfg: Config, parts: tuple[str, ...] = ALL_PARTS) -> str:
    """A directory on this node holding what `parts` of `ref` load: itself when local, the hub snapshot for a hub
    id, and for an `s3://` directory a copy under run.scratch (downloaded once per node, under a lock)."""
    if not ref or not (is_hub_id(ref) or storage.is_s3(ref)):
        return ref
    if is_hub_id(ref):
        return resolve_hub_id(ref, cfg, parts)
    from trainer.scratch import run_scratch

    local = run_scratch(cfg, "models", ref[len("s3://"):].strip("/").replace("/", "--"))
    with _lock(os.path.dirname(local), os.path.basename(local)):
        if not os.path.exists(os.path.join(local, ".complete")):
            need = int(storage.filesystem(ref).du(ref[len("s3://"):].rstrip("/")))
            ensure_free(local, need, f"model.pretrained={ref!r}: copying the model dir")
            storage.download_dir(ref, local)
            open(os.path.join(local, ".complete"), "w").close()
    return local


def with_local_weights(cfg: Config, parts: tuple[str, ...] = ("text", "vae")) -> Config:
    """A copy of `cfg` whose model.pretrained / model.text_encoder name directories on THIS node holding `parts`
    (default: the text encoders and the VAE, what every caller loads through it; hub ids and s3:// dirs resolved
    by `local_model_dir`). For loading only: what a checkpoint records stays the original reference, so an export
    made elsewhere resolves it again."""
    import copy

    if not any(is_hub_id(r) or storage.is_s3(r) for r in (cfg.model.pretrained, cfg.model.text_encoder)):
        return cfg
    out = copy.deepcopy(cfg)
    out.model.pretrained = local_model_dir(cfg.model.pretrained, cfg, parts)
    out.model.text_encoder = local_model_dir(cfg.model.text_encoder, cfg, parts)
    return out


def push_to_hub(out_dir: str, repo_id: str) -> str:
    """Upload the export dir to a Hub model repo (credentials from the HF token chain, never printed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model")
    return f"https://huggingface.co/{repo_id}"
