"""Property tests of ResumableSampler: for any dataset size, world size, epoch and resume
position, the ranks' shards partition the epoch, and a resumed shard is the rest of the full one.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataloader.samplers import ResumableSampler


def shard(size: int, world_size: int, rank: int, *, shuffle: bool, drop_uneven: bool, seed: int,
          epoch: int, start: int = 0) -> tuple[list[tuple[int, int]], int]:
    """``((index, augmentation seed) pairs, len(sampler))`` of one rank's sampler."""
    sampler = ResumableSampler(size, shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size, drop_uneven=drop_uneven)
    sampler.set_epoch(epoch, start=start)
    return list(sampler), len(sampler)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 40), world_size=st.integers(1, 6), shuffle=st.booleans(),
       drop_uneven=st.booleans(), seed=st.integers(0, 2**32), epoch=st.integers(0, 50),
       start=st.integers(0, 12))
def test_shards_partition_the_epoch_and_resume_where_they_stopped(
        size, world_size, shuffle, drop_uneven, seed, epoch, start):
    options = dict(shuffle=shuffle, drop_uneven=drop_uneven, seed=seed, epoch=epoch)
    full = [shard(size, world_size, rank, **options) for rank in range(world_size)]
    shards = [pairs for pairs, _ in full]
    assert all(length == len(pairs) for pairs, length in full)

    # Disjoint, and they cover the epoch: all items, or (training) all but fewer than
    # world_size of them, so that every rank runs the same number of steps.
    indices = [index for pairs in shards for index, _ in pairs]
    assert len(indices) == len(set(indices)) and set(indices) <= set(range(size))
    if drop_uneven:
        assert len(indices) == size - size % world_size
        assert {len(pairs) for pairs in shards} <= {size // world_size}
    else:
        assert sorted(indices) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # The shards are one order dealt round-robin: rank r holds positions r, r + w, ...
    order = [index for index, _ in shard(size, 1, 0, **options)[0]]
    dealt = [shards[p % world_size][p // world_size][0] for p in range(len(indices))]
    assert dealt == order[:len(indices)]
    if not shuffle:
        assert order == list(range(size))
    # Every sample of the epoch draws its own augmentation, on every rank (no two ranks apply
    # the same scale, crop and flip at a step).
    seeds = [seed for pairs in shards for _, seed in pairs]
    assert len(set(seeds)) == len(seeds)

    for rank in range(world_size):
        resumed, length = shard(size, world_size, rank, start=start, **options)
        assert resumed == shards[rank][start:]  # same items, same augmentation seeds
        assert length == len(resumed)
