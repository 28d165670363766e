"""TensorBoard events written by TensorboardSummary, read back with TensorBoard's own reader."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utils.summaries import TensorboardSummary

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def reload(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_scalars_and_metrics_round_trip(tmp_path):
    summary = TensorboardSummary(tmp_path)
    summary.add_scalar("train/loss", 1.5, step=0)
    summary.add_scalar("train/loss", torch.tensor(0.75), step=10)
    results = {
        "pixel_accuracy": 0.9,
        "mean_class_accuracy": 0.8,
        "mean_iou": 0.625,
        "fw_iou": 0.85,
        "per_class_iou": {"background": 0.95, "car": 0.3, "boat": None},
    }
    summary.log_metrics(results, step=1, class_names=["background", "car", "boat"])
    summary.close()

    accumulator = reload(tmp_path)
    assert set(accumulator.Tags()["scalars"]) == {
        "train/loss", "val/mIoU", "val/pixel_accuracy", "val/mean_class_accuracy", "val/fwIoU",
        "val_iou/background", "val_iou/car",  # boat's IoU is undefined: not written
    }
    assert scalar_series(accumulator, "train/loss") == [(0, 1.5), (10, 0.75)]
    assert scalar_series(accumulator, "val/mIoU") == [(1, 0.625)]
    assert scalar_series(accumulator, "val/pixel_accuracy") == [(1, pytest.approx(0.9))]
    assert scalar_series(accumulator, "val/mean_class_accuracy") == [(1, pytest.approx(0.8))]
    assert scalar_series(accumulator, "val/fwIoU") == [(1, pytest.approx(0.85))]
    assert scalar_series(accumulator, "val_iou/background") == [(1, pytest.approx(0.95))]
    assert scalar_series(accumulator, "val_iou/car") == [(1, pytest.approx(0.3))]


def test_log_metrics_without_class_names_writes_every_defined_class(tmp_path):
    summary = TensorboardSummary(tmp_path)
    results = {"mean_iou": None, "per_class_iou": {"a": 0.5, "b": None}}
    summary.log_metrics(results, step=2)
    summary.close()
    assert reload(tmp_path).Tags()["scalars"] == ["val_iou/a"]


def test_visualize_draws_input_gt_and_prediction_rows(tmp_path):
    # Two 4x4 samples; de-normalised inputs are 0.25 (sample 0) and 0.75 (sample 1) everywhere.
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    targets = torch.tensor([1, 2, 255, 0]).repeat(2, 4, 1)  # columns: class 1, 2, ignore, 0
    predictions = torch.full((2, 4, 4), 2)
    extra = torch.zeros(1, 4, 4, dtype=torch.long)  # a third sample beyond max_images
    summary = TensorboardSummary(tmp_path)
    summary.visualize(
        torch.cat([images, images[:1]]),
        torch.cat([targets, extra]),
        torch.cat([predictions, extra]),
        palette=PALETTE, mean=MEAN, std=STD, step=3, max_images=2,
    )
    summary.close()

    accumulator = reload(tmp_path)
    (event,) = accumulator.Images("val/input_gt_prediction")
    assert event.step == 3
    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    # make_grid: 3 columns and 2 rows of 4x4 cells, with 2 pixels of padding around each.
    assert grid.shape == (2 + 2 * 6, 2 + 3 * 6, 3)

    def cell(row: int, column: int) -> np.ndarray:
        top, left = 2 + 6 * row, 2 + 6 * column
        return grid[top : top + 4, left : left + 4]

    assert np.abs(cell(0, 0).astype(int) - int(0.25 * 255)).max() <= 1
    assert np.abs(cell(1, 0).astype(int) - int(0.75 * 255)).max() <= 1
    gt = cell(0, 1)
    assert gt[0, 0].tolist() == PALETTE[1]
    assert gt[0, 1].tolist() == PALETTE[2]
    assert gt[0, 2].tolist() == [255, 255, 255]  # ignore is white
    assert gt[0, 3].tolist() == PALETTE[0]
    assert (cell(1, 2) == np.array(PALETTE[2], dtype=np.uint8)).all()


def test_visualize_draws_an_id_beyond_the_palette_black_as_every_output_does(tmp_path):
    palette = [[255, 0, 0], [0, 255, 0]]  # no black entry: black can only be the rule's
    targets = torch.tensor([[[0, 5], [255, 1]]])  # 5: a class the palette lacks
    predictions = torch.tensor([[[7, 7], [1, 0]]])
    summary = TensorboardSummary(tmp_path)
    summary.visualize(torch.zeros(1, 3, 2, 2), targets, predictions, palette=palette,
                      mean=MEAN, std=STD, step=0)
    summary.close()
    (event,) = reload(tmp_path).Images("val/input_gt_prediction")
    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    gt, prediction = grid[2:4, 6:8], grid[2:4, 10:12]  # 2-pixel padding around 2x2 cells
    assert gt.tolist() == [[[255, 0, 0], [0, 0, 0]], [[255, 255, 255], [0, 255, 0]]]
    assert prediction.tolist() == [[[0, 0, 0], [0, 0, 0]], [[0, 255, 0], [255, 0, 0]]]


def test_purge_step_drops_steps_of_the_interrupted_run(tmp_path):
    first = TensorboardSummary(tmp_path)
    for step in range(10):
        first.add_scalar("train/loss", float(step), step)
    first.close()
    # Resume from a checkpoint taken at step 5: steps 5..9 of the first run must disappear.
    resumed = TensorboardSummary(tmp_path, purge_step=5)
    for step in range(5, 8):
        resumed.add_scalar("train/loss", 100.0 + step, step)
    resumed.flush()
    resumed.close()

    series = scalar_series(reload(tmp_path), "train/loss")
    assert [step for step, _ in series] == list(range(8))
    assert [value for _, value in series] == [0.0, 1.0, 2.0, 3.0, 4.0, 105.0, 106.0, 107.0]


def test_figures_become_images_under_their_tags(tmp_path):
    figure = np.zeros((6, 4, 3), dtype=np.uint8)
    figure[:, :, 0] = 200  # red, so that a channel mix-up shows
    summary = TensorboardSummary(tmp_path)
    summary.add_figures({"confusion_matrix": figure, "per_class_iou": figure}, step=12)
    summary.close()
    accumulator = reload(tmp_path)
    assert set(accumulator.Tags()["images"]) == {"val/confusion_matrix", "val/per_class_iou"}
    (event,) = accumulator.Images("val/confusion_matrix")
    assert (event.step, event.height, event.width) == (12, 6, 4)
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert np.array_equal(pixels, figure)
