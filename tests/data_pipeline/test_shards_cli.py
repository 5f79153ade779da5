"""`piflow shards build|inspect|encode` end to end (the command group lives in cluster/commands.py)."""
import io
import tarfile

import pytest

from cluster.cli import main
from data_pipeline.encoding.packing import from_bytes
from data_pipeline import storage
from data_pipeline.shards import resolve_shards
from tests.data_pipeline.helpers import new_bucket


def test_build_and_inspect_on_s3(tmp_path, s3_server, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"caption": "a  cat"}\n{"caption": "a cat"}\n{"caption": "a dog", "seed": 4}\n')
    out = new_bucket() + "/prompts"
    assert main(["shards", "build", str(src), "--out", out, "--column", "caption", "--per-shard", "1",
                 "--normalize", "--dedup"]) == 0
    assert "wrote 2 prompts in 2 shards" in capsys.readouterr().out
    assert main(["shards", "inspect", out]) == 0
    text = capsys.readouterr().out
    assert "shards: 2 (0 unreadable)" in text and "valid samples: 2" in text and "'a dog'" in text
    # a bad record makes inspect report it and exit non-zero
    storage.put_bytes(storage.join(out, "zz.tar"), _tar({"bad.txt": b"\xff"}))
    assert main(["shards", "inspect", out]) == 1
    assert "zz.tar key='bad': invalid_utf8" in capsys.readouterr().out


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.ray
def test_encode_with_the_configs_tiny_text_encoder(tmp_path, capsys, ray_local):
    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\n")
    raw, enc = str(tmp_path / "raw"), str(tmp_path / "enc")
    assert main(["shards", "build", str(src), "--out", raw]) == 0
    flux = tmp_path / "flux.yaml"
    flux.write_text("model:\n  family: flux\n  tiny: true\n  max_sequence_length: 8\n")
    assert main(["shards", "encode", raw, "--out", enc, "--config", str(flux)]) == 0
    [url] = resolve_shards(enc)
    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(url))) as tar:
        d = from_bytes(tar.extractfile("000000001.emb.safetensors").read())
    assert d["prompt_embeds"].shape[0] == 8 and d["pooled_prompt_embeds"].dim() == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  family: dit\n")  # dit's "encoder": class ids written as text
    (tmp_path / "ids.txt").write_text("207\n3\n")
    ids_raw, ids_enc = str(tmp_path / "ids_raw"), str(tmp_path / "ids_enc")
    assert main(["shards", "build", str(tmp_path / "ids.txt"), "--out", ids_raw]) == 0
    assert main(["shards", "encode", ids_raw, "--out", ids_enc, "--config", str(cfg)]) == 0
    [url] = resolve_shards(ids_enc)
    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(url))) as tar:
        d = from_bytes(tar.extractfile("000000000.emb.safetensors").read())
    assert d["class_labels"].item() == 207
