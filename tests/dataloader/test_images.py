"""dataloader.images: listing inference inputs (folders, lists, single files) and reading them."""
from __future__ import annotations

import pytest
from PIL import Image

from dataloader.images import ImageFiles, list_inputs
from dataloader.utils import DatasetError
from inference_testing import relatives, touch


def test_a_folder_is_walked_recursively_skipping_hidden_and_other_files(tmp_path):
    root = tmp_path / "in"
    for name in ("b.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.webp", ".hidden.jpg",
                 ".cache/e.jpg", "notes.txt", "sub/readme.md"):
        touch(root / name)
    (root / "folder.jpg").mkdir()  # a folder named like an image is walked like any other
    (root / "folder.jpg" / "inside.png").write_bytes(b"x")
    assert relatives(list_inputs(root)) == ["a.png", "b.JPG", "folder.jpg/inside.png",
                                            "sub/c.jpeg", "sub/deeper/d.webp"]


def test_a_list_file_takes_paths_relative_to_itself_and_mirrors_below_their_common_folder(
        tmp_path):
    touch(tmp_path / "photos" / "x" / "a.jpg")
    touch(tmp_path / "photos" / "y" / "a.jpg")
    elsewhere = touch(tmp_path / "photos" / "b.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "job.txt").write_text(
        f"# my job\n../photos/x/a.jpg\n\n \t\n  # indented comment\n../photos/y/a.jpg\r\n{elsewhere}\n"
        f"../photos/gone.jpg\n")
    items = list_inputs(lists / "job.txt")
    assert [item.path for item in items] == [
        tmp_path / "photos" / "x" / "a.jpg", tmp_path / "photos" / "y" / "a.jpg", elsewhere,
        tmp_path / "photos" / "gone.jpg"]
    assert relatives(items) == ["x/a.jpg", "y/a.jpg", "b.png", "gone.jpg"]


def test_list_lines_keep_their_spaces(tmp_path):
    """Spaces are part of a file name: only the line end comes off a listed path."""
    lead = touch(tmp_path / " lead space.jpg")
    trail = touch(tmp_path / "trail space.jpg ")
    (tmp_path / "job.txt").write_text(" lead space.jpg\ntrail space.jpg \n")
    assert [item.path for item in list_inputs(tmp_path / "job.txt")] == [lead, trail]


def test_single_file_and_bad_in_paths(tmp_path):
    image = touch(tmp_path / "one.png")
    assert relatives(list_inputs(image)) == ["one.png"]
    with pytest.raises(DatasetError, match="does not exist"):
        list_inputs(tmp_path / "missing")
    with pytest.raises(DatasetError, match="neither an image"):
        list_inputs(touch(tmp_path / "model.pth"))
    with pytest.raises(DatasetError, match="lists no image"):
        list_inputs(touch(tmp_path / "empty.txt", b"# nothing\n"))


def test_bad_files_become_error_samples(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (5, 3), (10, 20, 30)).save(good)
    empty = touch(tmp_path / "empty.jpg", b"")
    text = touch(tmp_path / "text.png", b"not a png")
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    dataset = ImageFiles([good, empty, text, folder, tmp_path / "gone.jpg"])
    first = dataset[0]
    assert first["size"] == (3, 5) and first["image"].dtype.is_floating_point is False
    assert first["image"][:, 0, 0].tolist() == [10, 20, 30]
    for index, path in enumerate([empty, text, folder, tmp_path / "gone.jpg"], start=1):
        assert str(path) in dataset[index]["error"]
