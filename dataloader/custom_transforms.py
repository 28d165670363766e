"""Joint transforms of a sample ``{"image": PIL RGB or float32 (C, H, W) tensor, "label": PIL "L"}``.

8-bit colour images stay PIL images; images of other bands or bit depths (1 or N channels,
16-bit, float) arrive as float32 ``(C, H, W)`` tensors on the unit scale
(:func:`dataloader.utils.unit_scaled`) and every transform handles them with torch (bilinear
resize with antialiasing, pad, flip, Gaussian blur per channel); labels are handled alike in both
cases.

Every geometric transform moves the image and the label together; labels are resampled NEAREST
(so no in-between class appears) and padded with ``IGNORE_INDEX`` so padding is never learned or
scored, while the image is padded with 0. The work stays on PIL images until
:class:`ToTensorNormalize`, the last step: PIL's resampling and filters are several times faster
than round trips through tensors, and the train pipeline must keep up with the GPU on few cores.
Randomness comes from torch's global generator only; train.py seeds it for every sample from
(seed, epoch, position) (see dataloader/samplers.py), so a run, or a resumed run, draws the same
augmentations whatever the number of workers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from dataloader.utils import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

Sample = dict[str, Any]


def _functional():
    """torchvision's v2 functional transforms, imported on first use: importing torchvision
    is slow (it loads torch._dynamo), and inference of an exported model never needs it."""
    import torchvision.transforms.v2.functional as functional

    return functional


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """A random integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, ()))


def _nearest_window(
    label: Image.Image, new_size: tuple[int, int], window: tuple[int, int, int, int]
) -> Image.Image:
    """The ``window`` (left, top, right, bottom) of ``label`` resized NEAREST to ``new_size``.

    Output pixel ``x`` takes source pixel ``floor((x + 0.5) * width / new_width)``, the one under
    its centre (the convention PIL's bilinear resampling of the image uses too), computed in
    integers: PIL's own NEAREST accumulates floats and can pick the neighbour when a centre
    falls exactly on a pixel border, which would shift a cropped label against a full resize.
    """
    width, height = label.size
    left, top, right, bottom = window
    columns = (2 * np.arange(left, right) + 1) * width // (2 * new_size[0])
    rows = (2 * np.arange(top, bottom) + 1) * height // (2 * new_size[1])
    return Image.fromarray(np.asarray(label).take(rows, axis=0).take(columns, axis=1))


def _image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``(C, H, W)`` tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def _resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float ``(C, H, W)`` image resized bilinearly to ``size`` = ``(width, height)``, with
    antialiasing when shrinking (as PIL's resampling)."""
    return torch.nn.functional.interpolate(image[None], size=(size[1], size[0]), mode="bilinear",
                                           align_corners=False, antialias=True)[0]


class Compose:
    """Apply transforms in order to the sample dict."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {transform!r}," for transform in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class RandomScaleCrop:
    """Rescale to a random short side, pad to the crop size if needed, and take a random crop.

    The short side is drawn uniformly from ``[scale_range[0] * base_size, scale_range[1] *
    base_size]`` pixels and the aspect ratio is kept. Padding goes right and bottom (image 0,
    label 255). The result is always ``crop_size x crop_size``.

    Only the region that ends up in the crop is resampled (``Image.resize(box=...)`` for the
    image), which gives the pixels of resizing the whole image and then cropping (to +-1 grey
    level) for a fraction of the work when the scale is large.
    """

    def __init__(
        self, base_size: int, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0)
    ) -> None:
        if base_size <= 0 or crop_size <= 0:
            raise ValueError(
                f"base_size and crop_size must be positive, got {base_size} and {crop_size}"
            )
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.base_size = base_size
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, sample: Sample) -> Sample:
        image, label = sample["image"], sample["label"]
        width, height = _image_size(image)
        crop = self.crop_size
        short_side = _randint(
            max(1, int(self.scale_range[0] * self.base_size)),
            max(1, int(self.scale_range[1] * self.base_size)),
        )
        if height > width:
            new_width, new_height = short_side, max(1, int(height * short_side / width + 0.5))
        else:
            new_width, new_height = max(1, int(width * short_side / height + 0.5)), short_side
        # Crop origin in the rescaled (and right/bottom padded) image.
        left = _randint(0, max(new_width, crop) - crop)
        top = _randint(0, max(new_height, crop) - crop)
        # The part of the crop window that lies on the rescaled image, mapped back to the source.
        right, bottom = min(left + crop, new_width), min(top + crop, new_height)
        scale_x, scale_y = width / new_width, height / new_height
        box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
        size = (right - left, bottom - top)
        if isinstance(image, torch.Tensor):
            image = _resize_tensor(image, (new_width, new_height))[:, top:bottom, left:right]
        else:
            image = image.resize(size, Image.Resampling.BILINEAR, box=box)
        label = _nearest_window(label, (new_width, new_height), (left, top, right, bottom))
        if size != (crop, crop):
            padding = [0, 0, crop - size[0], crop - size[1]]  # left, top, right, bottom
            image = _functional().pad(image, padding, fill=0)
            label = _functional().pad(label, padding, fill=IGNORE_INDEX)
        return {**sample, "image": image, "label": label}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_size={self.base_size}, crop_size={self.crop_size}, "
                f"scale_range={self.scale_range})")


class RandomHorizontalFlip:
    """Mirror image and label left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        return {**sample, "image": _functional().horizontal_flip(sample["image"]),
                "label": _functional().horizontal_flip(sample["label"])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomGaussianBlur:
    """Blur the image (not the label) with probability ``p``; sigma is uniform in ``sigma_range``
    pixels.

    Sigmas up to 1 pixel use a 3x3 Gaussian kernel (the one-pixel image border stays unfiltered,
    as with any PIL kernel filter): it is faster than PIL's general Gaussian filter
    (``python -m bench.data_loader`` times the pipeline), which is used for larger sigmas, and the blur is the slowest step of the train pipeline.
    """

    def __init__(self, p: float = 0.5, sigma_range: tuple[float, float] = (0.1, 1.0)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not 0 < sigma_range[0] <= sigma_range[1]:
            raise ValueError(f"sigma_range must be 0 < low <= high, got {sigma_range}")
        self.p = p
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))

    @staticmethod
    def _filter(sigma: float) -> ImageFilter.Filter:
        if sigma > 1.0:
            return ImageFilter.GaussianBlur(radius=sigma)
        taps = np.exp(-0.5 * (np.arange(-1, 2) / sigma) ** 2)
        kernel = np.outer(taps, taps)
        return ImageFilter.Kernel((3, 3), (kernel / kernel.sum()).reshape(-1).tolist(), scale=1)

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        sigma = _uniform(*self.sigma_range)
        image = sample["image"]
        if isinstance(image, torch.Tensor):  # the same kernels, per channel
            size = 3 if sigma <= 1.0 else 2 * int(np.ceil(3 * sigma)) + 1
            return {**sample, "image": _functional().gaussian_blur(image, [size, size],
                                                                   [sigma, sigma])}
        return {**sample, "image": image.filter(self._filter(sigma))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma_range={self.sigma_range})"


class ResizeShortSide:
    """Resize the IMAGE so its short side is ``size`` pixels (aspect kept, bilinear).

    The label is left at full resolution on purpose: evaluation upsamples the prediction to it, so
    scores are computed on the original pixels, as the benchmarks define them.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size

    def __call__(self, sample: Sample) -> Sample:
        functional = _functional()
        image = functional.resize(sample["image"], [self.size],
                                  interpolation=functional.InterpolationMode.BILINEAR)
        return {**sample, "image": image}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ``(3, H, W)`` uint8 tensor (converted to RGB first if needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class Normalize:
    """uint8 ``(..., C, H, W)`` 0-255 pixels -> float32 ``(x / 255 - mean) / std``; float
    pixels, already on the unit scale (:func:`dataloader.utils.unit_scaled`), -> ``(x - mean) /
    std``. ``mean`` and ``std`` hold one value per channel.

    The one normalisation of evaluation and inference: both call this object, so the same image
    gives the same input bits to the model whichever script feeds it.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = [float(value) for value in mean]
        self.std = [float(value) for value in std]
        if not self.mean or len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"mean and std need one value per channel, std > 0; got {mean} "
                             f"and {std}")
        channels = len(self.mean)
        # (x / 255 - mean) / std folded into one subtraction and one multiplication on 0-255
        # values: faster than pil_to_tensor + to_dtype + normalize.
        self._offset = torch.tensor(self.mean).view(channels, 1, 1) * 255.0
        self._factor = 1.0 / (torch.tensor(self.std).view(channels, 1, 1) * 255.0)
        self._unit_offset = torch.tensor(self.mean).view(channels, 1, 1)
        self._unit_factor = 1.0 / torch.tensor(self.std).view(channels, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-3] != len(self.mean):
            raise ValueError(f"images of {pixels.shape[-3]} channels, but the normalisation has "
                             f"{len(self.mean)} (a model for other images?)")
        unit = pixels.is_floating_point()
        image = pixels.to(torch.float32, copy=True)  # never normalise the caller's tensor
        offset, factor = ((self._unit_offset, self._unit_factor) if unit
                          else (self._offset, self._factor))
        return image.sub_(offset.to(image.device)).mul_(factor.to(image.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class ToTensorNormalize:
    """PIL pair -> ``{"image": float32 (C, H, W) normalised, "label": int64 (H, W)}``.

    The image (a PIL RGB image, or a unit-scale float tensor of any channel count) is scaled to
    [0, 1] then normalised with ``mean``/``std`` (ImageNet by default, as
    the torchvision backbones expect) by :class:`Normalize`; label values are kept as they are
    (255 = ignore).
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.normalize = Normalize(mean, std)

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        image = self.normalize(image if isinstance(image, torch.Tensor)
                               else pil_to_uint8_tensor(image))
        label = torch.from_numpy(np.array(sample["label"], dtype=np.int64))
        return {**sample, "image": image, "label": label}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.normalize.mean}, "
                f"std={self.normalize.std})")


def train_transform(base_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Training augmentation: random scale (0.5-2x ``base_size`` short side) and
    ``crop_size`` crop, horizontal flip, light blur, then tensors normalised per channel."""
    return Compose([
        RandomScaleCrop(base_size, crop_size),
        RandomHorizontalFlip(),
        RandomGaussianBlur(),
        ToTensorNormalize(mean, std),
    ])


def eval_transform(eval_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Evaluation: the image optionally resized to a ``eval_size`` short side, the label kept at
    full resolution, then tensors (image and label sizes differ when ``eval_size`` is set)."""
    steps: list[Callable[[Sample], Sample]] = []
    if eval_size is not None:
        steps.append(ResizeShortSide(eval_size))
    steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)
