"""ENet class weights: hand-computed values, the cache, and its invalidation."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader.class_weights import compute_class_weights
from dataloader.datasets.folder import FolderSegmentation
from dataloader.utils import DatasetError

# 2 x 4 masks; 255 is ignored.
MASK_A = [[0, 0, 0, 0], [1, 1, 255, 255]]
MASK_B = [[0, 0, 2, 2], [255, 255, 255, 255]]
# Labelled pixels: class 0: 4 + 2 = 6, class 1: 2, class 2: 2, class 3 ("sky"): 0 -> 10 in all,
# p = (0.6, 0.2, 0.2, 0.0) and w = 1 / ln(1.02 + p):
#   1 / ln(1.62) = 1 / 0.482426 = 2.072856,  1 / ln(1.22) = 1 / 0.198851 = 5.028895,
#   1 / ln(1.02) = 1 / 0.019803 = 50.498350.
EXPECTED = [2.072856, 5.028895, 5.028895, 50.498350]

# After mask B becomes all class 3: class 0: 4, class 1: 2, class 2: 0, class 3: 8 -> 14 in all,
# p = (4/14, 2/14, 0, 8/14) = (0.285714, 0.142857, 0, 0.571429):
#   1 / ln(1.305714) = 3.748825,  1 / ln(1.162857) = 6.627782,  50.498350,
#   1 / ln(1.591429) = 2.152241.
EXPECTED_AFTER_CHANGE = [3.748825, 6.627782, 50.498350, 2.152241]


def write_mask(path: Path, rows: list[list[int]]) -> None:
    Image.fromarray(np.array(rows, dtype=np.uint8), mode="L").save(path)


def make_root(root: Path) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nroad\nbuilding\nsky\n")
    for name, rows in (("a", MASK_A), ("b", MASK_B)):
        Image.new("RGB", (4, 2), (9, 9, 9)).save(root / "images" / "train" / f"{name}.png")
        write_mask(root / "masks" / "train" / f"{name}.png", rows)
    return root


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_weights_match_hand_computation(tmp_path):
    dataset = FolderSegmentation(make_root(tmp_path / "data"))
    weights = compute_class_weights(dataset, num_classes=4, cache_dir=tmp_path / "cache")
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED), rtol=0, atol=1e-5)


def test_second_call_reads_the_cache_and_nothing_lands_in_the_dataset(tmp_path, monkeypatch):
    root = make_root(tmp_path / "data")
    before = files_under(root)
    cache_dir = tmp_path / "cache"
    dataset = FolderSegmentation(root)
    first = compute_class_weights(dataset, num_classes=4, cache_dir=cache_dir)
    cache_files = os.listdir(cache_dir)
    assert len(cache_files) == 1 and cache_files[0].endswith(".json")  # no temporary left over

    def must_not_read(index: int) -> Image.Image:
        raise AssertionError("the masks were read again despite a cache")

    monkeypatch.setattr(dataset, "label_at", must_not_read)
    torch.testing.assert_close(compute_class_weights(dataset, 4, cache_dir=cache_dir), first)
    assert files_under(root) == before


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path / "env_cache"))
    compute_class_weights(FolderSegmentation(make_root(tmp_path / "data")), num_classes=4)
    assert len(os.listdir(tmp_path / "env_cache")) == 1


def test_changed_mask_invalidates_the_cache(tmp_path):
    root = make_root(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    compute_class_weights(FolderSegmentation(root), num_classes=4, cache_dir=cache_dir)

    mask = root / "masks" / "train" / "b.png"
    write_mask(mask, [[3, 3, 3, 3], [3, 3, 3, 3]])
    stat = mask.stat()  # move the mtime on, in case the file system's clock is coarse
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))

    weights = compute_class_weights(FolderSegmentation(root), num_classes=4, cache_dir=cache_dir)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED_AFTER_CHANGE), rtol=0, atol=1e-5)
    assert len(os.listdir(cache_dir)) == 2


def test_num_classes_is_part_of_the_key(tmp_path):
    dataset = FolderSegmentation(make_root(tmp_path / "data"))
    cache_dir = tmp_path / "cache"
    compute_class_weights(dataset, num_classes=4, cache_dir=cache_dir)
    # Five classes: the same 10 pixels, plus a fifth absent class at 1 / ln(1.02).
    five = compute_class_weights(dataset, num_classes=5, cache_dir=cache_dir)
    torch.testing.assert_close(five, torch.tensor(EXPECTED + [50.498350]), rtol=0, atol=1e-5)


def test_corrupt_cache_file_is_recomputed(tmp_path):
    dataset = FolderSegmentation(make_root(tmp_path / "data"))
    cache_dir = tmp_path / "cache"
    compute_class_weights(dataset, num_classes=4, cache_dir=cache_dir)
    (cache_file,) = cache_dir.iterdir()
    cache_file.write_text('{"weights": [1.0, 2')
    weights = compute_class_weights(dataset, num_classes=4, cache_dir=cache_dir)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED), rtol=0, atol=1e-5)


def test_cache_inside_dataset_folder_is_refused(tmp_path):
    root = make_root(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"inside the dataset folder.*--cache-dir"):
        compute_class_weights(FolderSegmentation(root), 4, cache_dir=root / "cache")
    assert not (root / "cache").exists()


def test_labels_beyond_num_classes_are_a_bug(tmp_path):
    dataset = FolderSegmentation(make_root(tmp_path / "data"))
    # Mask b holds class 2, which two classes cannot hold: a caller's mistake, not bad data.
    with pytest.raises(ValueError, match=r"class id 2 but num_classes is 2"):
        compute_class_weights(dataset, num_classes=2, cache_dir=tmp_path / "cache")


def test_bad_mask_is_skipped_only_when_asked(tmp_path):
    root = make_root(tmp_path / "data")
    dataset = FolderSegmentation(root, skip_bad_images=True)
    (root / "masks" / "train" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"b\.png \(sample 1\)"):
        compute_class_weights(FolderSegmentation(root), 4, cache_dir=tmp_path / "cache")
    # Mask a alone: class 0: 4, class 1: 2 -> 6 pixels, p = (4/6, 2/6, 0, 0):
    #   1 / ln(1.686667) = 1 / 0.522754 = 1.912945,  1 / ln(1.353333) = 1 / 0.302571 = 3.305013.
    weights = compute_class_weights(dataset, 4, cache_dir=tmp_path / "cache")
    expected = torch.tensor([1.912945, 3.305013, 50.498350, 50.498350])
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)
