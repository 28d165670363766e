"""The contract every dataset follows, so train.py and the tests treat them alike."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dataloader.utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    file_fingerprint,
    image_size,
    load_image,
    load_label,
    palette_for,
    verify_image,
)

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
    #: Image channels and whether the images are 8-bit colour, read as PIL RGB images and
    #: normalised with ImageNet's statistics; other images are float32 ``(C, H, W)`` tensors on
    #: the unit scale (:func:`dataloader.utils.unit_scaled`).
    in_channels: int = 3
    rgb8: bool = True
    #: The input normalisation (per channel), set by :func:`dataloader.statistics.set_inputs`.
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

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

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model to be used on new images: class names,
        palette and the input normalisation (plain types only)."""
        return {
            "class_names": list(self.class_names),
            "palette": [[int(c) for c in color] for color in self.palette],
            "mean": [float(value) for value in self.mean],
            "std": [float(value) for value in self.std],
            "in_channels": int(self.in_channels),
        }

    def load_sample(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Return ``(RGB image, "L" label)`` for item ``index``; raise DatasetError on bad files."""
        raise NotImplementedError

    def mask_reading(self) -> str:
        """How the mask files become class ids, for reports; empty when there is one way."""
        return ""

    def sample_name(self, index: int) -> str:
        """How figures and reports name item ``index`` (its image file's name where there is
        one)."""
        return f"#{index}"

    def label_at(self, index: int) -> Image.Image:
        """The label of item ``index`` alone; subclasses override it to skip decoding the image."""
        return self.load_sample(index)[1]

    def check_sample(self, index: int) -> np.ndarray:
        """Check that item ``index`` loads as training would load it, as cheaply as possible.

        Used by ``train.py --check-data`` over a whole dataset. The default loads the sample;
        subclasses skip what the check does not need (a full-size decode of the image).

        Returns:
            The ``(H, W)`` uint8 label at full size.

        Raises:
            DatasetError: the first problem found (unreadable image, mask of another size, class
                id out of range), naming the file.
        """
        return np.asarray(self.load_sample(index)[1])

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


class PairedFileDataset(SegmentationDataset):
    """A dataset whose items are ``(image file, mask file)`` pairs listed in ``self.samples``.

    Subclasses fill ``samples`` in their constructor; :meth:`read_label` turns a mask file into
    the label (override it to remap raw values) and :meth:`extra_cache_files` names the files
    besides the pairs (a split list, ``classes.txt``) whose change must invalidate caches.
    """

    samples: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        return os.path.basename(self.samples[index][0])

    def read_label(self, index: int, size: tuple[int, int]) -> Image.Image:
        """The label of item ``index``, whose image is ``size`` = ``(width, height)``."""
        return load_label(self.samples[index][1], size, self.num_classes, index=index)

    def load_sample(self, index: int) -> tuple[Image.Image, Image.Image]:
        image = load_image(self.samples[index][0], index=index)
        return image, self.read_label(index, image.size)

    def label_at(self, index: int) -> Image.Image:
        """The label alone; its size comes from the mask itself, so it is not checked against
        the image here (loading the sample does that)."""
        return self.read_label(index, image_size(self.samples[index][1], index))

    def check_sample(self, index: int) -> np.ndarray:
        """The image decoded at reduced size, its size from its header, the mask in full."""
        size = verify_image(self.samples[index][0], index=index)
        return np.asarray(self.read_label(index, size))

    def extra_cache_files(self) -> list[str | os.PathLike]:
        return []

    def cache_key(self) -> str:
        return file_fingerprint(*self.extra_cache_files(),
                                *(path for pair in self.samples for path in pair))
