"""Exact resume: the consumed key sequence equals an uninterrupted run's, whatever the number of ranks."""
import json

import pytest

from data_pipeline.order import sample_order, shard_order
from data_pipeline.reader import ReadOptions
from data_pipeline.stream import PromptStream, RankBatches
from tests.data_pipeline.helpers import new_bucket, write_shards

SIZES = [5, 7, 3, 6]  # 21 prompts: batch 4 crosses the epoch boundary in step 6
SEED = 11


def reference_keys(sizes, seed, epochs):
    """Brute force: shard order per epoch, then the within-shard order, with the keys the writer used."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    out = []
    for e in range(epochs):
        for si in shard_order(seed, e, len(sizes)):
            name = f"shard-{si:06d}.tar"
            out += [f"k{starts[si] + j:05d}" for j in sample_order(seed, e, name, sizes[si])]
    return out


def uninterrupted(urls, steps, batch):
    s = PromptStream(urls, batch, seed=SEED)
    keys = [k for _ in range(steps) for k in next(s).keys]
    s.close()
    return keys


def interleave(slices, layout):
    if layout == "contiguous":
        return [k for sl in slices for k in sl]
    return [sl[i] for i in range(len(slices[0])) for sl in slices]


def test_uninterrupted_stream_follows_the_reference_order(tmp_path):
    urls = write_shards(str(tmp_path), SIZES)
    keys = uninterrupted(urls, 11, 4)  # 44 samples: 2 epochs and 2 more
    ref = reference_keys(SIZES, SEED, 3)
    assert keys == ref[:44]
    assert sorted(keys[:21]) == sorted(keys[21:42]) == [f"k{i:05d}" for i in range(21)]  # each once per epoch


@pytest.mark.parametrize("k", [2, 5, 6, 11])
@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_two_ranks_then_one_rank_resumes_exactly(tmp_path, k, layout):
    urls = write_shards(str(tmp_path), SIZES)
    total, batch = 16, 4
    expected = uninterrupted(urls, total, batch)

    ranks = [RankBatches(PromptStream(urls, batch, seed=SEED), r, 2, layout) for r in range(2)]
    consumed = []
    for _ in range(k):
        slices = [next(rb).keys for rb in ranks]
        assert all(len(s) == batch // 2 for s in slices)
        consumed += interleave(slices, layout)
    states = [rb.state_dict() for rb in ranks]
    assert states[0] == states[1]
    saved = json.loads(json.dumps(states[0]))  # what a checkpoint stores
    for rb in ranks:
        rb.source.close()

    one = RankBatches(PromptStream(urls, batch, seed=SEED), 0, 1, layout)
    one.load_state_dict(saved)
    for _ in range(total - k):
        consumed += next(one).keys
    one.source.close()
    assert consumed == expected  # no repeat, no skip, same order


def test_resume_on_s3_across_epoch_boundary(s3_server):
    urls = write_shards(new_bucket() + "/p", SIZES)
    expected = uninterrupted(urls, 9, 4)
    s = PromptStream(urls, 4, seed=SEED)
    got = [k for _ in range(6) for k in next(s).keys]  # step 6 takes samples 20..23: epoch 0 -> 1
    state = s.state_dict()
    assert state["epoch"] == 1
    s.close()
    r = PromptStream(urls, 4, seed=SEED)
    r.load_state_dict(state)
    got += [k for _ in range(3) for k in next(r).keys]
    r.close()
    assert got == expected


def test_cursor_rejects_another_shard_list_or_seed(tmp_path):
    urls = write_shards(str(tmp_path), SIZES)
    s = PromptStream(urls, 4, seed=SEED)
    next(s)
    state = s.state_dict()
    with pytest.raises(ValueError, match="different shard list"):
        PromptStream(urls[:3], 4, seed=SEED).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptStream(urls, 4, seed=SEED + 1).load_state_dict(state)


def test_unshuffled_order_is_tar_order(tmp_path):
    urls = write_shards(str(tmp_path), SIZES)
    opts = ReadOptions(shuffle_shards=False, shuffle_within_shard=False)
    s = PromptStream(str(tmp_path), 7, seed=0, options=opts)  # a directory resolves to its sorted .tar files
    assert next(s).keys + next(s).keys + next(s).keys == [f"k{i:05d}" for i in range(21)]
    s.close()
    assert len(urls) == 4
