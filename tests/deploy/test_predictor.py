"""The Python API (:class:`deploy.predictor.Predictor`): what it takes as an image, and calls
from several threads at once."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader.custom_transforms import Normalize, ToTensorNormalize
from deploy.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor.load(str(ckpt), engine="torch", device="cpu", amp="off")[0]


def photo(seed: int, height: int = 40, width: int = 56) -> torch.Tensor:
    """uint8 (3, H, W) smooth random colours."""
    small = torch.randint(0, 256, (1, 3, height // 8, width // 8),
                          generator=torch.Generator().manual_seed(seed)).float()
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear"
                                           )[0].round().to(torch.uint8)


def test_every_documented_image_kind_gives_the_masks_of_its_rgb_pixels(predictor):
    rgb = photo(0)
    expected = predictor.predict(rgb)
    assert expected.dtype == torch.uint8 and tuple(expected.shape) == (40, 56)
    hwc = rgb.permute(1, 2, 0).numpy()
    alpha = torch.full((1, 40, 56), 7, dtype=torch.uint8)
    same = {
        "numpy (H, W, 3)": hwc,
        "PIL RGB": Image.fromarray(hwc),
        "PIL RGBA": Image.fromarray(np.dstack([hwc, alpha[0].numpy()])),
        "torch (1, 3, H, W)": rgb[None],
        "torch (4, H, W) RGBA": torch.cat([rgb, alpha]),
        "numpy (H, W, 4) RGBA": np.dstack([hwc, alpha[0].numpy()]),
        "a non-contiguous view": rgb.permute(0, 2, 1).contiguous().permute(0, 2, 1),
    }
    for kind, image in same.items():
        assert torch.equal(predictor.predict(image), expected), kind
    grey = rgb[1]
    expected_grey = predictor.predict(grey.expand(3, -1, -1).contiguous())
    for kind, image in {"torch (H, W)": grey, "torch (1, H, W)": grey[None],
                        "numpy (H, W)": grey.numpy(), "numpy (H, W, 1)": grey[..., None].numpy(),
                        "PIL L": Image.fromarray(grey.numpy())}.items():
        assert torch.equal(predictor.predict(image), expected_grey), kind


@pytest.mark.parametrize("image, words", [
    (photo(0).float() / 255, "uint8"),          # torchvision's 0-1 floats
    (photo(0).float(), "uint8"),                # 0-255 floats
    (photo(0).permute(1, 2, 0), "(3, H, W)"),   # a torch tensor channels last
    (photo(0)[None].expand(2, -1, -1, -1), "one RGB image"),
    (photo(0)[:2], "shape (2, 40, 56)"),
    (torch.zeros(3, 0, 5, dtype=torch.uint8), "shape (3, 0, 5)"),
    ([[1, 2], [3, 4]], "got list"),
])
def test_other_inputs_are_one_value_error_naming_what_is_expected(predictor, image, words):
    with pytest.raises(ValueError) as raised:
        predictor.predict(image)
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_two_threads_get_the_masks_of_one(ckpt):
    """The default engine on a CPU (OpenVINO where installed): 20 calls from two threads."""
    predictor, _ = Predictor.load(str(ckpt), device="cpu")
    images = [photo(seed, 40 + 8 * (seed % 3), 56) for seed in range(20)]
    alone = [predictor.predict(image) for image in images]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(predictor.predict, images))
    assert sum(torch.equal(a, b) for a, b in zip(alone, together)) == 20


def test_normalize_is_the_eval_transform_arithmetic_and_leaves_its_input_alone():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    sample = {"image": Image.fromarray(pixels), "label": Image.fromarray(pixels[..., 0])}
    expected = ToTensorNormalize()(sample)["image"]
    uint8 = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    assert torch.equal(Normalize()(uint8), expected)
    # By hand: (x / 255 - mean) / std for one pixel.
    by_hand = (pixels[3, 4, 0] / 255 - 0.485) / 0.229
    assert expected[0, 3, 4].item() == pytest.approx(by_hand, abs=1e-5)
    floats = expected.clone()
    Normalize()(floats)
    assert torch.equal(floats, expected)
