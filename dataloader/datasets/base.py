"""The contract every dataset follows, so train.py and the tests treat them alike."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from dataloader.utils import DatasetError, palette_for

logger = logging.getLogger(__name__)

Sample = dict[str, Any]


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``class_names`` and implement :meth:`load_sample`.

    Without a transform, ``ds[i]`` is ``{"image": PIL RGB image, "label": PIL "L" image}`` with
    label values in ``[0, num_classes)`` and 255 (ignore). With a transform, ``ds[i]`` is whatever
    the transform returns for that dict. With ``skip_bad_images``, a sample whose files are bad is
    logged and returned as ``None`` (see :func:`dataloader.utils.collate_skipping_bad`) instead of
    raising :class:`DatasetError`.
    """

    class_names: Sequence[str] = ()

    def __init__(
        self,
        transform: Callable[[Sample], Any] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def palette(self) -> list[list[int]]:
        """Per-class RGB colours (plain lists)."""
        return palette_for(self.num_classes)

    def load_sample(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Return ``(RGB image, "L" label)`` for item ``index``; raise DatasetError on bad files."""
        raise NotImplementedError

    def label_at(self, index: int) -> Image.Image:
        """The label of item ``index`` alone; subclasses override it to skip decoding the image."""
        return self.load_sample(index)[1]

    def cache_key(self) -> str:
        """A string that changes whenever the files behind this split change (for caches)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        try:
            image, label = self.load_sample(index)
        except DatasetError as error:
            if not self.skip_bad_images:
                raise
            logger.warning("skipping bad sample: %s", error)
            return None
        sample: Sample = {"image": image, "label": label}
        return self.transform(sample) if self.transform is not None else sample
