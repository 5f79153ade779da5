"""Each kind of bad input (DESIGN.md §5) against the loopback S3 server: counted, reported, the run goes on."""
import io
import logging
import tarfile

import pytest

from data_pipeline import storage
from data_pipeline.reader import ReadOptions
from data_pipeline.shards import format_inspect, inspect
from data_pipeline.stream import PromptStream, RankBatches
from tests.data_pipeline.helpers import new_bucket, prompt_samples, tar_bytes

LONG = "x" * 50


def _mixed_shard() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("g0.txt", b"good zero")
        add("g1.txt", b"good one")
        link = tarfile.TarInfo("sym.txt")  # a member that cannot be extracted as a file
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add("README", b"a member that belongs to no sample")
        add("nojson.json", b'{"seed": 3}')  # json but no txt
        add("empty.txt", b"   \n")
        add("utf8.txt", b"caf\xc3 \xff\xfe")
        add("long.txt", LONG.encode())
        add("badmeta.txt", b"fine prompt")
        add("badmeta.json", b'{"seed": "three"}')
        add("g2.txt", b"good two")
        add("g2.json", b'{"negative_prompt": "blurry", "seed": 7, "size": [64, 32]}')
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_dataset(s3_server):
    root = new_bucket("bad") + "/shards"
    good = tar_bytes(prompt_samples(3, 4, prefix="g"))
    storage.put_bytes(storage.join(root, "a-000.tar"), _mixed_shard())
    # a-001.tar is listed but never written: a missing shard
    storage.put_bytes(storage.join(root, "a-002.tar"), good[:3600])  # truncated inside the 4th member
    corrupt = bytearray(tar_bytes(prompt_samples(10, 3, prefix="c")))
    corrupt[1024:1024 + 100] = b"\x07" * 100  # the second header: garbage
    storage.put_bytes(storage.join(root, "a-003.tar"), bytes(corrupt))
    storage.put_bytes(storage.join(root, "a-004.tar"), good)
    return [storage.join(root, f"a-{i:03d}.tar") for i in range(5)]


OPTS = dict(max_prompt_chars=20, read_attempts=2, read_backoff_s=0.01, shuffle_shards=False, shuffle_within_shard=False)


def test_truncate_mode_counts_every_bad_input_and_goes_on(bad_dataset, caplog):
    s = PromptStream(bad_dataset, 1, seed=0, options=ReadOptions(overlong="truncate", **OPTS))
    with caplog.at_level(logging.WARNING):
        batches = [next(s) for _ in range(8)]
    keys = [b.keys[0] for b in batches]
    assert keys == ["g0", "g1", "long", "g2", "g00003", "g00004", "g00005", "g00006"]
    assert batches[2].prompts == [LONG[:20]]
    assert batches[3].meta == [{"negative_prompt": "blurry", "seed": 7, "size": [64, 32]}]
    st = s.stats
    assert dict(st.bad) == {"unreadable_member": 2, "missing_txt": 1, "empty_txt": 1, "invalid_utf8": 1,
                            "bad_json": 1}
    assert {(b.shard, b.key, b.reason) for b in st.bad_records} == {
        ("a-000.tar", "sym", "unreadable_member"), ("a-000.tar", "README", "unreadable_member"),
        ("a-000.tar", "nojson", "missing_txt"), ("a-000.tar", "empty", "empty_txt"),
        ("a-000.tar", "utf8", "invalid_utf8"), ("a-000.tar", "badmeta", "bad_json")}
    assert st.truncated == 1 and st.samples == 8
    assert [u.rsplit("/", 1)[1] for u, _ in st.skipped_shards] == ["a-001.tar", "a-002.tar", "a-003.tar"]
    m = s.state_dict()["stats"]
    assert m["bad"]["invalid_utf8"] == 1 and len(m["skipped_shards"]) == 3
    assert s.stats.metrics()["data/skipped_shards"] == 3.0
    # never silent: each was logged with its shard and key
    text = caplog.text
    for needle in ("key='utf8'", "key='sym'", "a-001.tar", "a-002.tar", "truncated", "key='long'"):
        assert needle in text
    # and the run goes on into the next epoch
    assert next(s).keys == ["g0"]
    s.close()


def test_skip_mode_drops_overlong_prompts(bad_dataset):
    s = PromptStream(bad_dataset, 1, seed=0, options=ReadOptions(overlong="skip", **OPTS))
    keys = [next(s).keys[0] for _ in range(7)]
    assert keys == ["g0", "g1", "g2", "g00003", "g00004", "g00005", "g00006"]
    assert s.stats.bad["overlong"] == 1 and s.stats.truncated == 0
    s.close()


def test_resume_stays_exact_over_bad_records(bad_dataset):
    opts = ReadOptions(overlong="truncate", **{**OPTS, "shuffle_shards": True, "shuffle_within_shard": True})
    full = PromptStream(bad_dataset, 2, seed=3, options=opts)
    expected = [k for _ in range(10) for k in next(full).keys]
    full_stats = full.state_dict()["stats"]
    full.close()
    ranks = [RankBatches(PromptStream(bad_dataset, 2, seed=3, options=opts), r, 2) for r in range(2)]
    got = []
    for _ in range(3):
        a, b = (next(r).keys for r in ranks)
        got += [a[0], b[0]]
    state = ranks[0].state_dict()
    one = PromptStream(bad_dataset, 2, seed=3, options=opts)
    one.load_state_dict(state)
    got += [k for _ in range(7) for k in next(one).keys]
    assert got == expected
    assert one.state_dict()["stats"] == full_stats  # counters resume too
    for r in ranks:
        r.source.close()
    one.close()


def test_inspect_reports_every_bad_record_with_shard_and_key(bad_dataset):
    rep = inspect(bad_dataset, num_examples=2, options=ReadOptions(**OPTS))
    assert [n for _, n in rep.shards] == [9, -1, -1, -1, 4]  # a-000: 9 keyed samples (README belongs to none)
    assert rep.samples == 8 and rep.truncated == 1
    assert len(rep.bad) == 6 and len(rep.unreadable) == 3
    text = format_inspect(rep)
    assert "a-003.tar" in text and "key='utf8': invalid_utf8" in text and "'good zero'" in text


def test_all_bad_data_fails_clearly_instead_of_spinning(s3_server):
    root = new_bucket("allbad")
    storage.put_bytes(root + "/x.tar", tar_bytes([("e", {"txt": b" "})]))
    s = PromptStream(root, 1, seed=0, options=ReadOptions(read_attempts=1))
    with pytest.raises(RuntimeError, match="no valid prompt"):
        next(s)
