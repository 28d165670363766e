"""Evaluator scores against a 3x3 confusion matrix worked out by hand."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import numpy as np

from utils.metrics import Evaluator, WorstImages, metrics_json

NAMES = ("road", "car", "sky")

# Ten pixels; the last one is ignored (255).
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 255])
PREDICTION = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 2, 1])
# Rows = ground truth, columns = prediction:
#   gt 0 predicted (0, 0, 1)    -> [2, 1, 0]
#   gt 1 predicted (1, 2)       -> [0, 1, 1]
#   gt 2 predicted (2, 2, 0, 2) -> [1, 0, 3]
HAND_MATRIX = [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
# 9 scored pixels, 2 + 1 + 3 = 6 correct.
PIXEL_ACCURACY = 6 / 9
# Recall per row: 2/3, 1/2, 3/4.
MEAN_CLASS_ACCURACY = (2 / 3 + 1 / 2 + 3 / 4) / 3
# Row sums (3, 2, 4), column sums (3, 2, 4); IoU = diag / (row + col - diag):
#   2 / (3 + 3 - 2) = 1/2,  1 / (2 + 2 - 1) = 1/3,  3 / (4 + 4 - 3) = 3/5.
IOU = (1 / 2, 1 / 3, 3 / 5)
MEAN_IOU = (1 / 2 + 1 / 3 + 3 / 5) / 3  # = 43/90
# Ground-truth frequencies 3/9, 2/9, 4/9.
FW_IOU = 3 / 9 * 1 / 2 + 2 / 9 * 1 / 3 + 4 / 9 * 3 / 5


def hand_evaluator() -> Evaluator:
    evaluator = Evaluator(num_classes=3)
    # Split into two "images" to check accumulation across calls.
    evaluator.add_batch(TARGET[:4].reshape(1, 2, 2), PREDICTION[:4].reshape(1, 2, 2))
    evaluator.add_batch(TARGET[4:].reshape(2, 1, 3), PREDICTION[4:].reshape(2, 1, 3))
    return evaluator


def test_confusion_matrix_by_hand():
    evaluator = hand_evaluator()
    assert evaluator.confusion_matrix.dtype == torch.int64
    assert evaluator.confusion_matrix.tolist() == HAND_MATRIX


def test_scores_by_hand():
    evaluator = hand_evaluator()
    assert evaluator.pixel_accuracy() == pytest.approx(PIXEL_ACCURACY)
    assert evaluator.mean_class_accuracy() == pytest.approx(MEAN_CLASS_ACCURACY)
    assert evaluator.per_class_iou().tolist() == pytest.approx(list(IOU))
    assert evaluator.mean_iou() == pytest.approx(MEAN_IOU)
    assert evaluator.frequency_weighted_iou() == pytest.approx(FW_IOU)


def test_scores_by_hand_when_ground_truth_and_predictions_are_spread_differently():
    # The matrix above has equal row and column sums: it cannot tell ground-truth frequency from
    # predicted frequency, nor recall from precision. Here they differ.
    # gt 0 0 0 0 1 2, predicted 0 0 1 1 1 1: rows [2, 2, 0], [0, 1, 0], [0, 1, 0];
    # row (ground truth) sums 4, 1, 1; column (prediction) sums 2, 4, 0.
    evaluator = Evaluator(num_classes=3)
    evaluator.add_batch(torch.tensor([0, 0, 0, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 1, 1]))
    assert evaluator.confusion_matrix.tolist() == [[2, 2, 0], [0, 1, 0], [0, 1, 0]]
    # IoU: 2 / (4 + 2 - 2), 1 / (1 + 4 - 1), 0 / (1 + 0 - 0).
    assert evaluator.per_class_iou().tolist() == pytest.approx([1 / 2, 1 / 4, 0.0])
    assert evaluator.mean_iou() == pytest.approx(1 / 4)
    # Recall 2/4, 1/1, 0/1 (precision would be 2/2, 1/4 and undefined: mean 5/8).
    assert evaluator.mean_class_accuracy() == pytest.approx(1 / 2)
    assert evaluator.pixel_accuracy() == pytest.approx(3 / 6)
    # Weighted by ground-truth frequency 4/6, 1/6, 1/6 (by predicted frequency: 1/3).
    assert evaluator.frequency_weighted_iou() == pytest.approx(4 / 6 * 1 / 2 + 1 / 6 * 1 / 4)


def test_results_are_plain_json():
    results = hand_evaluator().results(NAMES)
    json.dumps(results, allow_nan=False)
    assert results["mean_iou"] == pytest.approx(MEAN_IOU)
    assert results["fw_iou"] == pytest.approx(FW_IOU)
    assert results["pixel_accuracy"] == pytest.approx(PIXEL_ACCURACY)
    assert results["mean_class_accuracy"] == pytest.approx(MEAN_CLASS_ACCURACY)
    assert list(results["per_class_iou"]) == list(NAMES)
    assert list(results["per_class_iou"].values()) == pytest.approx(list(IOU))


def test_format_table_shows_percentages():
    table = hand_evaluator().format_table(NAMES)
    lines = table.splitlines()
    assert any(line.startswith("road") and line.endswith("50.00") for line in lines)
    assert any(line.startswith("car") and line.endswith("33.33") for line in lines)
    assert any(line.startswith("sky") and line.endswith("60.00") for line in lines)
    assert any(line.startswith("mean IoU") and line.endswith("47.78") for line in lines)  # 43/90
    assert any(line.startswith("pixel accuracy") and line.endswith("66.67") for line in lines)
    assert any(line.startswith("mean class accuracy") and line.endswith("63.89") for line in lines)
    fw_line = next(line for line in lines if line.startswith("frequency-weighted IoU"))
    assert fw_line.endswith("50.74")


def test_ignored_and_out_of_range_targets_are_not_counted():
    evaluator = Evaluator(num_classes=3)
    target = torch.tensor([[255, 255, 3, -1, 1]])
    prediction = torch.tensor([[0, 1, 2, 2, 1]])
    evaluator.add_batch(target, prediction)
    assert evaluator.confusion_matrix.sum().item() == 1
    assert evaluator.confusion_matrix[1, 1].item() == 1
    # uint8 labels, as decoded from PNG masks, ignore 255 too.
    evaluator.reset()
    evaluator.add_batch(torch.tensor([255, 2], dtype=torch.uint8), torch.tensor([0, 2]))
    assert evaluator.confusion_matrix.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_class_absent_everywhere_is_excluded_from_means():
    evaluator = Evaluator(num_classes=4)
    evaluator.add_batch(TARGET, PREDICTION)  # class 3 appears in neither
    iou = evaluator.per_class_iou()
    assert math.isnan(iou[3].item())
    assert evaluator.mean_iou() == pytest.approx(MEAN_IOU)
    assert evaluator.mean_class_accuracy() == pytest.approx(MEAN_CLASS_ACCURACY)
    results = evaluator.results([*NAMES, "boat"])
    assert results["per_class_iou"]["boat"] is None
    assert "n/a" in evaluator.format_table([*NAMES, "boat"])


def test_class_only_predicted_counts_as_zero_iou():
    evaluator = Evaluator(num_classes=2)
    # gt all class 0; one pixel wrongly predicted as 1: IoU0 = 3/4, IoU1 = 0/1.
    evaluator.add_batch(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    assert evaluator.per_class_iou().tolist() == pytest.approx([3 / 4, 0.0])
    assert evaluator.mean_iou() == pytest.approx(3 / 8)
    # Class 1 has no ground truth, so its recall is undefined and left out.
    assert evaluator.mean_class_accuracy() == pytest.approx(3 / 4)


def test_perfect_prediction_scores_one():
    evaluator = Evaluator(num_classes=3)
    labels = torch.randint(0, 3, (2, 8, 8))
    evaluator.add_batch(labels, labels.clone())
    results = evaluator.results(NAMES)
    for key in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou"):
        assert results[key] == 1.0
    present = set(labels.unique().tolist())
    for index, name in enumerate(NAMES):
        assert results["per_class_iou"][name] == (1.0 if index in present else None)


def test_reset_and_empty_matrix():
    evaluator = hand_evaluator()
    evaluator.reset()
    assert evaluator.confusion_matrix.sum().item() == 0
    results = evaluator.results(NAMES)
    assert results["mean_iou"] is None and results["pixel_accuracy"] is None
    json.dumps(results, allow_nan=False)


def test_bad_inputs():
    evaluator = Evaluator(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        evaluator.add_batch(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        evaluator.add_batch(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 class names"):
        evaluator.results(["a", "b"])


def test_all_reduce_is_a_no_op_without_distributed():
    evaluator = hand_evaluator()
    evaluator.all_reduce()
    assert evaluator.confusion_matrix.tolist() == HAND_MATRIX


def _reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        evaluator = Evaluator(num_classes=3)
        # Each rank sees half of the hand example.
        half = slice(0, 5) if rank == 0 else slice(5, 10)
        evaluator.add_batch(TARGET[half], PREDICTION[half])
        evaluator.all_reduce()
        torch.save(evaluator.confusion_matrix, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_two_processes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        matrix = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert matrix.tolist() == HAND_MATRIX


# ---------------------------------------------------------------- the confusion matrix in results

# Row sums (3, 1, 1) differ from column sums (1, 4, 0): a transposed matrix would fail.
SKEWED_TARGET = torch.tensor([0, 0, 0, 1, 2, 255])
SKEWED_PREDICTION = torch.tensor([0, 1, 1, 1, 1, 0])
SKEWED_MATRIX = [[1, 2, 0], [0, 1, 0], [0, 1, 0]]


def test_results_hold_the_confusion_matrix_whose_rows_count_each_class():
    evaluator = Evaluator(num_classes=3)
    evaluator.add_batch(SKEWED_TARGET, SKEWED_PREDICTION)
    results = evaluator.results(NAMES)
    assert results["confusion_matrix"] == SKEWED_MATRIX
    pixels_per_class = [3, 1, 1]  # class 0 three times, 1 and 2 once, the 255 not at all
    assert [sum(row) for row in results["confusion_matrix"]] == pixels_per_class


def test_metrics_json_round_trips_with_one_matrix_row_per_line():
    evaluator = Evaluator(num_classes=3)
    evaluator.add_batch(SKEWED_TARGET, SKEWED_PREDICTION)
    results = dict(evaluator.results(NAMES), iteration=7)
    text = metrics_json(results)
    assert json.loads(text) == results
    assert "    [1, 2, 0],\n    [0, 1, 0],\n    [0, 1, 0]\n  ]" in text
    empty = dict(results, confusion_matrix=[])
    assert json.loads(metrics_json(empty)) == empty


# ---------------------------------------------------------------- the worst images

MEAN3, STD3 = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def grid(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


# Per-image mIoU over the classes in the label or the prediction (scored pixels only):
HAND_IMAGES = [
    # 0: perfect: 1.0
    (grid([[0, 0], [1, 1]]), grid([[0, 0], [1, 1]])),
    # 1: class 0 IoU 2/4, class 1 IoU 0/2: mean 0.25
    (grid([[0, 0], [1, 1]]), grid([[0, 0], [0, 0]])),
    # 2: scored pixels 0->1 and 1->1: class 0 IoU 0/1, class 1 IoU 1/2; class 2 is predicted on
    #    ignored pixels only, so it is not present: mean 0.25 (a tie with image 1)
    (grid([[0, 1], [255, 255]]), grid([[1, 1], [2, 2]])),
    # 3: all ignored: no score, never kept
    (grid([[255, 255], [255, 255]]), grid([[0, 0], [0, 0]])),
    # 4: class 2 IoU 3/4, class 0 IoU 0/1: mean 0.375
    (grid([[2, 2], [2, 2]]), grid([[2, 2], [2, 0]])),
]
HAND_SCORES = {0: 1.0, 1: 0.25, 2: 0.25, 4: 0.375}


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` pixels normalised with MEAN3 and STD3."""
    return (pixels.float() / 255 - 0.5) / 0.25


def add_hand_images(worst: WorstImages, indices: list[int]) -> None:
    for index in indices:
        target, prediction = HAND_IMAGES[index]
        pixels = torch.full((1, 3, 2, 2), 10 * index, dtype=torch.uint8)
        worst.add([index], normalised(pixels), target[None], prediction[None])


def test_image_score_by_hand():
    for index, (target, prediction) in enumerate(HAND_IMAGES):
        score = WorstImages.image_score(target, prediction, num_classes=3)
        if index in HAND_SCORES:
            assert score == pytest.approx(HAND_SCORES[index])
        else:
            assert math.isnan(score)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]])
def test_worst_images_keeps_the_k_lowest_whatever_the_order(order):
    worst = WorstImages(3, num_classes=3, mean=MEAN3, std=STD3,
                        name_of=lambda index: f"image{index}.jpg")
    add_hand_images(worst, order)
    kept = worst.worst()
    # 0.25 (image 1), 0.25 (image 2; ties go by index), 0.375 (image 4); image 3 has no score.
    assert [entry.index for entry in kept] == [1, 2, 4]
    assert [entry.score for entry in kept] == pytest.approx([0.25, 0.25, 0.375])
    assert [entry.name for entry in kept] == ["image1.jpg", "image2.jpg", "image4.jpg"]
    first = kept[0]
    assert first.image.dtype == np.uint8 and first.image.shape == (2, 2, 3)
    assert (first.image == 10).all()  # the normalisation is undone
    assert first.target.tolist() == [[0, 0], [1, 1]]
    assert first.prediction.tolist() == [[0, 0], [0, 0]]
    assert kept[1].target.tolist() == [[0, 1], [255, 255]]  # ignore stays 255


def test_only_images_that_enter_are_named():
    asked = []
    worst = WorstImages(1, num_classes=3, mean=MEAN3, std=STD3,
                        name_of=lambda index: asked.append(index) or str(index))
    add_hand_images(worst, [1, 0, 4])  # 0 and 4 score higher than 1: never thumbnailed
    assert asked == [1]
    assert [entry.index for entry in worst.worst()] == [1]


def test_thumbnails_have_a_bounded_longest_side_and_the_label_aspect():
    worst = WorstImages(1, num_classes=2, mean=MEAN3, std=STD3, thumbnail_size=256)
    target = torch.zeros(1, 300, 600, dtype=torch.long)
    target[:, :, 300:] = 1  # right half class 1
    prediction = torch.zeros_like(target)
    # The input was fed at a smaller size (--eval-size): the thumbnail follows the label.
    worst.add([0], torch.zeros(1, 3, 60, 120), target, prediction)
    (entry,) = worst.worst()
    assert entry.image.shape == (128, 256, 3)
    assert entry.target.shape == entry.prediction.shape == (128, 256)
    assert set(np.unique(entry.target).tolist()) == {0, 1}  # nearest: no blended ids
    assert (entry.target[:, :128] == 0).all() and (entry.target[:, 128:] == 1).all()


def test_thumbnail_labels_are_resized_nearest_across_boundaries_off_the_grid():
    # A 10 x 30 label to a 3 x 8 thumbnail: thumbnail pixels span 10/3 rows and 30/8 = 3.75
    # columns, so the class boundaries at column 13 and row 7 fall inside a thumbnail pixel,
    # where any blending of ids (bilinear) would invent a value: 0/255 -> e.g. 159, 0/2 -> 1.
    worst = WorstImages(1, num_classes=3, mean=MEAN3, std=STD3, thumbnail_size=8)
    target = torch.zeros(1, 10, 30, dtype=torch.long)
    target[:, :, 13:] = 255
    prediction = torch.zeros_like(target)
    prediction[:, 7:, :] = 2
    worst.add([0], torch.zeros(1, 3, 10, 30), target, prediction)
    (entry,) = worst.worst()
    assert entry.target.shape == entry.prediction.shape == (3, 8)
    assert set(np.unique(entry.target).tolist()) == {0, 255}
    assert set(np.unique(entry.prediction).tolist()) == {0, 2}
    # Each thumbnail pixel takes the id of a label pixel under it.
    for thumbnail, source in ((entry.target, target[0]), (entry.prediction, prediction[0])):
        for i in range(3):
            for j in range(8):  # label pixels [10 i / 3, 10 (i + 1) / 3) x [30 j / 8, ...)
                under = source[i * 10 // 3:-(-(i + 1) * 10 // 3),
                               j * 30 // 8:-(-(j + 1) * 30 // 8)]
                assert thumbnail[i, j] in set(under.unique().tolist())


def test_worst_images_needs_a_positive_k():
    with pytest.raises(ValueError, match="k must be"):
        WorstImages(0, num_classes=3, mean=MEAN3, std=STD3)


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        worst = WorstImages(2, num_classes=3, mean=MEAN3, std=STD3)
        # Rank 0 sees images 0, 2, 4 and rank 1 images 1, 3, as the val sampler splits them.
        add_hand_images(worst, [0, 2, 4] if rank == 0 else [1, 3])
        worst.all_gather()
        torch.save([(entry.index, entry.score, entry.target.tolist())
                    for entry in worst.worst()], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_worst_images_gathered_across_two_processes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        kept = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # Image 1 came from rank 1, image 2 from rank 0; both ranks end with both.
        assert kept == [(1, 0.25, [[0, 0], [1, 1]]), (2, 0.25, [[0, 1], [255, 255]])]
