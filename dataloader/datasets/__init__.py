"""Dataset registry: one :class:`DatasetEntry` per ``--dataset`` name in :data:`DATASETS`.

A new dataset is its module (a :class:`~dataloader.datasets.base.SegmentationDataset`) plus one
entry here. ``train.py`` takes its ``--dataset`` choices and default ``--epochs`` from the
registry; ``mypath.py`` takes the dataset names and their environment variables from it, and
keeps the default root folders that a user edits for their machine.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from dataloader.datasets.base import SegmentationDataset
from dataloader.datasets.coco import COCOSegmentation
from dataloader.datasets.cocostuff import COCOStuffSegmentation
from dataloader.datasets.demo import ensure_demo_dataset
from dataloader.datasets.folder import MASK_FORMATS, FolderSegmentation
from dataloader.datasets.pascal import VOCSegmentation
from dataloader.utils import DatasetError


@dataclass(frozen=True)
class DatasetEntry:
    """What the tools look up about one dataset.

    Attributes:
        build: ``build(root, split, transform=..., skip_bad_images=..., cache_dir=...)`` returns
            the split ``"train"`` or ``"val"`` as a ``SegmentationDataset``.
        variable: the environment variable that names its root folder (above ``mypath.py``'s
            default, below ``--data-root``).
        epochs: ``train.py``'s ``--epochs`` when the flag is not given.
        generated: the root need not exist before the run: ``build`` creates the data there.
        options: the keywords ``build`` takes besides those above (how this dataset's files
            may be read, e.g. the folder dataset's ``mask_format``).
    """

    build: Callable[..., SegmentationDataset]
    variable: str
    epochs: int
    generated: bool = False
    options: tuple[str, ...] = ()


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


#: ``--dataset`` name -> entry (torchvision's COCO recipe trains 30 epochs).
DATASETS: dict[str, DatasetEntry] = {
    "coco": DatasetEntry(_coco, variable="DEEPLAB_COCO_ROOT", epochs=30),
    "cocostuff": DatasetEntry(_plain(COCOStuffSegmentation),
                              variable=COCOStuffSegmentation.root_variable, epochs=30),
    "demo": DatasetEntry(_demo, variable="DEEPLAB_DEMO_ROOT", epochs=15, generated=True),
    "folder": DatasetEntry(_plain(FolderSegmentation),
                           variable=FolderSegmentation.root_variable, epochs=50,
                           options=("mask_format", "reduce_zero_label")),
    "pascal": DatasetEntry(_plain(VOCSegmentation), variable=VOCSegmentation.root_variable,
                           epochs=50),
}


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name``.

    Raises:
        ValueError: naming the unknown dataset and the known ones.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def build_dataset(
    name: str,
    root: str,
    split: str,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | None = None,
    **options: Any,
) -> SegmentationDataset:
    """Build split ``split`` ("train" or "val") of dataset ``name`` stored under ``root``.

    Args:
        options: keywords of the dataset's :attr:`DatasetEntry.options`; those that are ``None``
            (a flag not given) are left out, so every dataset takes the same call.

    Raises:
        DatasetError: an option that is not ``None`` and that this dataset does not take (the
            message names its flag, the option with dashes).
    """
    entry = dataset_entry(name)
    given = {key: value for key, value in options.items() if value is not None}
    foreign = sorted(set(given) - set(entry.options))
    if foreign:
        readers = sorted(other for other, each in DATASETS.items() if foreign[0] in each.options)
        raise DatasetError(f"--{foreign[0].replace('_', '-')} is not read by --dataset {name} "
                           f"(only by {', '.join(readers) or 'no dataset'})")
    return entry.build(root, split, transform=transform, skip_bad_images=skip_bad_images,
                       cache_dir=cache_dir, **given)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """train.py's flags for the dataset and how it is read."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="coco", choices=sorted(DATASETS))
    data.add_argument("--data-root", help="dataset folder (overrides mypath.py and its variable)")
    data.add_argument("--workers", type=int, default=4, help="data loading processes per GPU")
    data.add_argument("--base-size", type=int, default=513, help="short side before 0.5-2x scaling")
    data.add_argument("--crop-size", type=int, default=513, help="square training crop")
    data.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                      help="skip unreadable images (counted per epoch) instead of stopping")
    data.add_argument("--cache-dir", help="where index caches and class weights are kept "
                      "(default: $DEEPLAB_CACHE_DIR or ~/.cache/deeplab)")
    data.add_argument("--use-balanced-weights", action=argparse.BooleanOptionalAction,
                      default=False, help="weight the loss by inverse log class frequency")
    data.add_argument("--mask-format", choices=MASK_FORMATS, help="--dataset folder: index (a "
                      "class id per pixel, 255 = ignore), binary (0 = background, other values = "
                      "class 1) or color (RGB, a colour per class in classes.txt); unset: index, "
                      "after refusing masks that look binary or colour")
    data.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction,
                      help="--dataset folder, index masks: 0 is unlabelled (ignored) and id k is "
                      "class k-1, as mmsegmentation's option; unset: off, after refusing masks "
                      "whose ids look 1-based")
    data.add_argument("--check-data", action="store_true", help="read every train and val sample, "
                      "list the bad ones and the class pixel histogram (and for non-RGB images "
                      "the --mean/--std line), exit (1: bad data)")
    data.add_argument("--mean", type=float, nargs="+", help="per-channel input mean on the unit "
                      "scale (uint8/255, uint16/65535, float as is); unset: ImageNet's for 8-bit "
                      "RGB, else the train split's (computed once, cached)")
    data.add_argument("--std", type=float, nargs="+", help="per-channel input std, as --mean")
