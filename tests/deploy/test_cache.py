"""What inference keeps between runs (:mod:`deploy.cache`): a cached file that no longer holds
what was written is found, deleted and built again, and a change anywhere in ``modeling/``
gives a new exported graph."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy import cache
from inference_testing import make_checkpoint, read_mask, require_deploy, write_image

REPO = Path(__file__).resolve().parents[2]


def test_the_graph_key_follows_every_file_of_the_modeling_package(tmp_path, monkeypatch):
    copy = tmp_path / "modeling"
    shutil.copytree(cache.modeling_folder(), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "modeling_folder", lambda: copy)
    ckpt = tmp_path / "weights.pth.tar"
    ckpt.write_bytes(b"the same weights throughout")
    keys = [cache.graph_key(ckpt), cache.graph_key(ckpt)]
    nested = copy / "backbone" / "resnet.py"
    nested.write_text(nested.read_text() + "\n# an edit in a sub-package\n")
    keys.append(cache.graph_key(ckpt))
    (copy / "aspp.py").write_text((copy / "aspp.py").read_text() + "\n# an edit at the top\n")
    keys.append(cache.graph_key(ckpt))
    ckpt.write_bytes(b"other weights")
    keys.append(cache.graph_key(ckpt))
    assert keys[0] == keys[1]
    assert len(set(keys[1:])) == 4, keys


def test_a_file_without_its_hash_or_with_another_content_is_deleted(tmp_path, warnings_of):
    # warnings_of: an in-process int8 test run before this one has left this logger disabled
    # (cause not found: an in-process quantize_int8 alone leaves every logger enabled)
    caplog = warnings_of("deploy.cache")
    kept, unhashed, damaged = (tmp_path / name for name in ("kept.bin", "new.bin", "bad.bin"))
    for path in (kept, unhashed, damaged):
        path.write_bytes(b"abc" * 1000)
    cache.record_digest(kept)
    cache.record_digest(damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(1500)
        handle.write(b"X")
    assert cache.verified(kept, "a test file")
    assert not cache.verified(unhashed, "a test file") and not unhashed.exists()
    assert not cache.verified(damaged, "a test file") and not damaged.exists()
    assert not cache.digest_path(damaged).exists()
    assert [record.getMessage() for record in caplog.records] == [
        f"a test file {damaged} is damaged (its content no longer matches the hash written "
        f"beside it): building it again"]


# ---------------------------------------------------------------- end to end, with OpenVINO


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    require_deploy("onnx", "openvino")
    folder = tmp_path_factory.mktemp("cache-e2e")
    for seed in range(3):
        write_image(folder / "in" / f"{seed}.png", 64 + 8 * seed, 48, seed=seed)
    return {"ckpt": make_checkpoint(folder / "r18.pth.tar", num_classes=5), "in": folder / "in"}


def segment(photos: dict, out: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """inference.py with OpenVINO and the cache in ``cache_dir``, in its own process."""
    result = subprocess.run(
        [sys.executable, "inference.py", "--in-path", str(photos["in"]), "--out-path", str(out),
         "--ckpt", str(photos["ckpt"]), "--engine", "openvino", "--workers", "0"],
        cwd=REPO, env=dict(os.environ, DEEPLAB_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1",
                           PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def damage(path: Path) -> None:
    """Overwrite 4 MB in the middle of ``path`` (its middle half if smaller) with noise; the
    size stays."""
    size = path.stat().st_size
    length = min(4 * 2**20, size // 2)
    with open(path, "r+b") as handle:
        handle.seek((size - length) // 2)
        handle.write(np.random.default_rng(0).integers(0, 256, length, np.uint8).tobytes())


def masks(folder: Path) -> list[np.ndarray]:
    return [read_mask(path) for path in sorted(folder.glob("*.png"))]


def damaged_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "damaged" in line]


@pytest.mark.slow
def test_a_damaged_cache_entry_is_rebuilt_with_one_line(photos, tmp_path):
    """OpenVINO's compiled model, then the exported graph: each damaged, each found."""
    cache_dir = tmp_path / "cache"
    assert not damaged_lines(segment(photos, tmp_path / "fresh", cache_dir))
    expected = masks(tmp_path / "fresh")
    assert len(expected) == 3
    for entry in ("openvino/*.blob", "onnx/*.onnx"):
        files = sorted(cache_dir.glob(entry))
        assert len(files) == 1, sorted(cache_dir.rglob("*"))
        damage(files[0])
        out = tmp_path / entry.split("/")[0]
        lines = damaged_lines(segment(photos, out, cache_dir))
        assert len(lines) == 1 and files[0].name in lines[0], lines
        assert all(np.array_equal(a, b) for a, b in zip(masks(out), expected))
