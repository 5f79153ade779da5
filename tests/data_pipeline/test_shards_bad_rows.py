"""`piflow shards build` on prompt files with bytes that are not UTF-8 (web-scraped prompt lists; issue 12):
every input format names each bad line or row (file and line number), counts it, skips it and builds the
rest. Before issue 12 the first such byte stopped the build with a UnicodeDecodeError traceback."""
import io
import tarfile

import pytest

from cluster.cli import main
from data_pipeline import storage
from data_pipeline.shards import build_shards, resolve_shards

BAD = b"caf\xe9 \xff au lait"  # latin-1 bytes: not UTF-8


def _prompts(out: str) -> list[str]:
    got = []
    for url in resolve_shards(out):
        with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(url))) as tar:
            got += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return got


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _parquet(tmp) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"a red cat", BAD, b"a blue dog"], type=pa.binary()).view(pa.string())  # not validated
    pq.write_table(pa.table({"prompt": raw, "seed": [1, 2, 3]}), str(tmp / "p.parquet"))
    return str(tmp / "p.parquet")


CASES = {
    "txt": (lambda p: _write(p / "p.txt", b"a red cat\n" + BAD + b"\na blue dog\n\xfe\n"), [":2", ":4"]),
    "jsonl": (lambda p: _write(p / "p.jsonl", b'{"prompt": "a red cat"}\n{"prompt": "' + BAD + b'"}\n'
                               b'{"prompt": "a blue dog"}\n{"prompt": \n'), [":2: not UTF-8", ":4: not valid JSON"]),
    # a quoted prompt over two lines first: the bad row starts on line 4 of the file
    "csv": (lambda p: _write(p / "p.csv", b'prompt,seed\n"a red\ncat",1\n' + BAD + b',2\na blue dog,3\n'), [":4"]),
    "parquet": (_parquet, [" row 2"]),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_bytes_are_named_counted_and_skipped(kind, tmp_path, capsys):
    make, where = CASES[kind]
    src = make(tmp_path)
    out = str(tmp_path / "out")
    assert main(["shards", "build", src, "--out", out, "--per-shard", "1"]) == 0
    captured = capsys.readouterr()
    assert f"{len(where)} bad rows)" in captured.out
    for w in where:  # each bad row named on its own line with file and line (row) number
        assert f"skipped {src}{w}" in captured.err, captured.err
    assert "Traceback" not in captured.err
    good = _prompts(out)
    assert len(good) == 2 and "a blue dog" in good and good[0].replace("\n", " ") == "a red cat"


def test_the_report_lists_the_bad_rows(tmp_path):
    src = _write(tmp_path / "p.txt", BAD + b"\nok\n")
    rep = build_shards(src, str(tmp_path / "o"), progress=False)
    assert rep.samples == 1 and [str(b) for b in rep.bad_rows] == [f"{src}:1: not UTF-8 (byte 3)"]
