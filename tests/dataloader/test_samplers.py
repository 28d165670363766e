"""ResumableSampler: each rank reads its own slice of every epoch, and a batch depends on
``(seed, epoch, position)`` only, never on the number of loader workers."""
from __future__ import annotations

import pytest
import torch

from dataloader.samplers import ResumableSampler, resumable_loader


def slices(size: int, world_size: int, *, shuffle: bool, drop_uneven: bool,
           epoch: int = 0) -> list[list[int]]:
    """The dataset indices each rank reads in ``epoch``."""
    out = []
    for rank in range(world_size):
        sampler = ResumableSampler(size, shuffle=shuffle, seed=5, rank=rank,
                                   world_size=world_size, drop_uneven=drop_uneven)
        sampler.set_epoch(epoch)
        indices = [index for index, _ in sampler]
        assert len(sampler) == len(indices)
        out.append(indices)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_scores_every_item_exactly_once_over_the_ranks(world_size):
    parts = slices(7, world_size, shuffle=False, drop_uneven=False)
    assert sorted(sum(parts, [])) == list(range(7))  # disjoint, and nothing left out
    # Rank r takes positions r, r + w, ...: 7 over 2 ranks is 4 + 3, over 3 ranks 3 + 2 + 2.
    assert [len(part) for part in parts] == {2: [4, 3], 3: [3, 2, 2]}[world_size]
    assert parts[0] == list(range(0, 7, world_size))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_training_ranks_read_disjoint_equal_slices_of_one_permutation(world_size, epoch):
    parts = slices(7, world_size, shuffle=True, drop_uneven=True, epoch=epoch)
    kept = 7 - 7 % world_size  # 6 of 7: every rank runs the same number of steps
    assert [len(part) for part in parts] == [kept // world_size] * world_size
    union = sum(parts, [])
    assert len(set(union)) == kept and set(union) <= set(range(7))
    # One permutation cut into slices: the single-process order interleaved rank by rank.
    whole = slices(7, 1, shuffle=True, drop_uneven=True, epoch=epoch)[0]
    assert [parts[p % world_size][p // world_size] for p in range(kept)] == whole[:kept]


def test_epochs_reshuffle_and_seeds_are_per_sample():
    first, second = (slices(50, 1, shuffle=True, drop_uneven=True, epoch=e)[0] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    sampler = ResumableSampler(50, shuffle=True, seed=5)
    seeds = [seed for _, seed in sampler]
    assert len(set(seeds)) == 50


def test_resuming_mid_epoch_yields_the_rest_of_that_epoch():
    sampler = ResumableSampler(9, shuffle=True, seed=2, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2


class RandomAugmentation(torch.utils.data.Dataset):
    """Item ``i`` is ``i`` plus three numbers drawn from torch's global RNG, as a random
    augmentation draws them."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.tensor([float(index)]), "label": torch.rand(3)}


def batches(workers: int, rank: int = 0, world_size: int = 1, epoch: int = 1) -> list[dict]:
    loader, sampler = resumable_loader(RandomAugmentation(), batch_size=2, shuffle=True, seed=7,
                                       rank=rank, world_size=world_size, workers=workers)
    sampler.set_epoch(epoch)
    return list(loader)


def test_batches_do_not_depend_on_the_number_of_workers():
    reference = batches(workers=0)
    assert len(reference) == 11 // 2
    for workers in (1, 2):
        got = batches(workers=workers)
        assert len(got) == len(reference)
        for mine, theirs in zip(got, reference):
            assert torch.equal(mine["image"], theirs["image"])  # same samples, same order
            assert torch.equal(mine["label"], theirs["label"])  # same augmentation draws
    # and the draws differ from sample to sample
    labels = torch.cat([batch["label"] for batch in reference])
    assert len({tuple(row.tolist()) for row in labels}) == len(labels)


def test_ranks_of_a_loader_read_disjoint_samples():
    seen = [torch.cat([b["image"] for b in batches(0, rank, 2)]).flatten().tolist()
            for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 4  # 11 -> 10 kept, 5 per rank, 2 whole batches


def test_batches_say_which_dataset_items_they_hold():
    loader, sampler = resumable_loader(RandomAugmentation(), batch_size=2, shuffle=True, seed=7)
    sampler.set_epoch(1)
    order = [index for index, _ in sampler]
    for number, batch in enumerate(loader):
        # Item i's image is i (RandomAugmentation): the index names the item in the batch.
        assert batch["index"].tolist() == order[2 * number: 2 * number + 2]
        assert batch["index"].tolist() == batch["image"].flatten().long().tolist()


def test_ranks_draw_independent_augmentations_at_the_same_step():
    # Ranks read different images and must not apply the same scale, crop and flip at a step:
    # the augmentation seed includes the rank, so no draw repeats across the ranks.
    ranks = [batches(0, rank, world_size=2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for mine, theirs in zip(*ranks):
        for first, second in zip(mine["label"], theirs["label"]):
            assert not torch.equal(first, second)
    draws = {tuple(row.tolist()) for rank in ranks for batch in rank for row in batch["label"]}
    assert len(draws) == 8  # 2 ranks x 2 batches x 2 samples
