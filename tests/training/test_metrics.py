"""Evaluator scores against a 3x3 confusion matrix worked out by hand."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.metrics import Evaluator

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
