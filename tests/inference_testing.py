"""Helpers of the inference tests: checkpoints built in-process, images written to disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader.utils import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASS_NAMES, palette_for
from modeling.deeplab import DeepLab


def touch(path: Path, data: bytes = b"x") -> Path:
    """A file at ``path`` (folders made) holding ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def relatives(items) -> list[str]:
    """The mirrored relative paths of listed inference inputs."""
    return [str(item.relative) for item in items]


def make_checkpoint(path: Path, *, backbone: str = "resnet18", num_classes: int = 21,
                    seed: int = 0) -> Path:
    """A train.py-style checkpoint (weights + settings) of a randomly initialised model.

    BatchNorm statistics are set to random, trained-looking values so that predictions vary
    across the image instead of one class winning everywhere.
    """
    torch.manual_seed(seed)
    model = DeepLab(backbone=backbone, output_stride=16, num_classes=num_classes).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    names = (list(VOC_CLASS_NAMES) if num_classes == 21
             else [f"class{i}" for i in range(num_classes)])
    settings = dict(model.settings(), class_names=names, palette=palette_for(num_classes),
                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    torch.save({"model": model.state_dict(), "settings": settings}, path)
    return path


def write_image(path: Path, width: int, height: int, seed: int = 0, **save_options) -> Path:
    """A smooth random RGB image (blobs of colour, so predictions form regions)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3),
                         dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    return path


#: How the optional deployment packages are installed, said by every test that skips without them.
DEPLOY_INSTALL = "pip install -r requirements-deploy.txt (make test installs it)"


def require_deploy(*names: str):
    """Skip the calling test (or module) unless every deployment package ``names`` imports,
    naming how to install it; returns the first one's module."""
    modules = [pytest.importorskip(name, reason=f"{name} is not installed: {DEPLOY_INSTALL}")
               for name in names]
    return modules[0]


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        assert mask.mode == "P", f"{path} is {mask.mode}, not a palette mask"
        return np.asarray(mask)


#: Flags of the quick inference runs: PyTorch in this process, no loader workers.
FAST = ["--engine", "torch", "--workers", "0"]


def run(ckpt, in_path, out_path, *extra) -> int:
    """``inference.py`` on ``in_path`` into ``out_path`` with :data:`FAST` and ``extra`` flags."""
    import inference

    return inference.cli(["--in-path", str(in_path), "--out-path", str(out_path),
                          "--ckpt", str(ckpt), *FAST, *extra])


def one_error_line(capsys) -> str:
    """What the run wrote to stderr, asserted to be one line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def assert_same_masks(first: Path, second: Path, count: int) -> None:
    """The two output folders hold the same ``count`` masks, pixel for pixel."""
    one = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    two = sorted(p.relative_to(second) for p in second.rglob("*.png"))
    assert one == two and len(one) == count
    for relative in one:
        assert np.array_equal(read_mask(first / relative), read_mask(second / relative)), relative
