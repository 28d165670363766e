"""Deterministic, resumable sampling.

The order of an epoch and the random augmentation of every sample are functions of
``(seed, epoch, position)`` only, so a run resumed at iteration *k* sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers. In a distributed run each rank
reads its own slice of the same permutation.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator

import torch

from dataloader.utils import collate_skipping_bad


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix64 finaliser), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(dataset index, augmentation seed)`` pairs for one rank.

    The augmentation seed is a function of ``(seed, epoch, rank, position in the rank's slice)``:
    ranks read different images and draw independent augmentations (a seed without the rank
    would make every rank apply the same scale, crop and flip at each step).

    Args:
        dataset_size: number of items in the dataset.
        shuffle: permute the items every epoch (training) or keep their order (evaluation).
        seed: base seed of the run.
        rank, world_size: this process's slice; rank ``r`` takes positions ``r, r + w, ...``.
        drop_uneven: training: cut the permutation to a multiple of ``world_size`` so every rank
            runs the same number of steps. Evaluation passes False so that every item is scored
            exactly once (no padding duplicates, unlike ``DistributedSampler``).
    """

    def __init__(
        self,
        dataset_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = True,
    ) -> None:
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples of this rank."""
        self.epoch = epoch
        self.start = start

    def _positions(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.drop_uneven:
            order = order[: len(order) - len(order) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._positions()):
            if position >= self.start:
                yield index, _mix(self.seed, self.epoch, position, self.rank, 1)

    def __len__(self) -> int:
        return max(len(self._positions()) - self.start, 0)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` runs its transform under ``seed``.

    The global torch RNG is forked, so seeding a sample never disturbs the caller's RNG (which
    matters when ``num_workers=0`` and samples are loaded in the training process itself).
    A dict sample gains ``"index"``, its dataset index, so that a batch says which items it holds
    (evaluation names its worst images by it) even after bad samples were dropped from it.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample = self.dataset[index]
        return {**sample, "index": index} if isinstance(sample, dict) else sample


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGINT/SIGTERM to the training process, which saves a checkpoint and
    shuts them down; a worker killed by Ctrl-C first would abort the run before it can save."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resumable_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> tuple[torch.utils.data.DataLoader, ResumableSampler]:
    """A DataLoader whose batches depend only on ``(seed, epoch, position)``: resumes are exact.

    A shuffling (training) loader drops the uneven tail of the epoch and the last partial
    batch; one that does not shuffle (validation) reads every sample. Bad samples
    (``--skip-bad-images``) are dropped by the collate function and counted in the batch's
    ``"skipped"`` entry. Call ``sampler.set_epoch`` before each epoch.
    """
    drop_last = shuffle
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank,
                               world_size=world_size, drop_uneven=drop_last)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate_skipping_bad,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        # A private generator: creating an iterator must not consume the global RNG, or a
        # resumed run's dropout would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
