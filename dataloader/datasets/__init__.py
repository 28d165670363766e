"""Dataset registry: ``--dataset`` takes its choices from :data:`DATASETS`.

A builder takes ``(root, split, transform, skip_bad_images, cache_dir)`` and returns a
:class:`~dataloader.datasets.base.SegmentationDataset`. A new dataset is one function here.
"""
from __future__ import annotations

from typing import Any, Callable

from dataloader.datasets.base import SegmentationDataset
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.cocostuff import COCOStuffSegmentation
from dataloader.datasets.demo import ensure_demo_dataset
from dataloader.datasets.folder import FolderSegmentation
from dataloader.datasets.pascal import VOCSegmentation


def _coco(root: str, split: str, cache_dir: str | None = None, **kwargs: Any) -> SegmentationDataset:
    return COCOSegmentation(root, split=split, cache_dir=cache_dir, **kwargs)


def _demo(root: str, split: str, cache_dir: str | None = None, **kwargs: Any) -> SegmentationDataset:
    # The demo set is generated once, then read by the same loader as real COCO.
    return COCOSegmentation(ensure_demo_dataset(root), split=split, cache_dir=cache_dir, **kwargs)


def _plain(cls: type) -> Callable[..., SegmentationDataset]:
    def build(root: str, split: str, cache_dir: str | None = None, **kwargs: Any) -> SegmentationDataset:
        del cache_dir  # these datasets keep no index worth caching
        return cls(root, split=split, **kwargs)

    return build


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "coco": _coco,
    "cocostuff": _plain(COCOStuffSegmentation),
    "demo": _demo,
    "folder": _plain(FolderSegmentation),
    "pascal": _plain(VOCSegmentation),
}


def build_dataset(
    name: str,
    root: str,
    split: str,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
) -> SegmentationDataset:
    """Build split ``split`` ("train" or "val") of dataset ``name`` stored under ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](
        root, split, transform=transform, skip_bad_images=skip_bad_images, cache_dir=cache_dir
    )
