"""Property tests: the Evaluator's confusion matrix and every score equal a brute-force count,
for any labels and predictions, with ignored (255) pixels, accumulated over several batches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.metrics import Evaluator

IGNORE = 255


@st.composite
def batches(draw):
    """``(num_classes, [(target, prediction), ...])``: 1-3 batches of small label maps; targets
    hold class ids, 255 and now and then another id outside the classes (also not scored),
    predictions class ids only."""
    num_classes = draw(st.integers(1, 6))
    pairs = []
    for _ in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        size = int(np.prod(shape))
        value = st.one_of(st.sampled_from([*range(num_classes), IGNORE]),
                          st.integers(num_classes, IGNORE - 1))
        target = draw(st.lists(value, min_size=size, max_size=size))
        prediction = draw(st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size))
        pairs.append((torch.tensor(target).reshape(shape), torch.tensor(prediction).reshape(shape)))
    return num_classes, pairs


def brute_force_counts(num_classes, pairs):
    """counts[true][predicted] by visiting every pixel; ids outside the classes (255) skipped."""
    counts = [[0] * num_classes for _ in range(num_classes)]
    for target, prediction in pairs:
        for true, predicted in zip(target.reshape(-1).tolist(), prediction.reshape(-1).tolist()):
            if true < num_classes:
                counts[true][predicted] += 1
    return counts


def mean_of_defined(values):
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def brute_force_scores(counts):
    """The five scores from their definitions, one class at a time, in plain Python."""
    classes = range(len(counts))
    total = sum(map(sum, counts))
    truth = [sum(counts[c]) for c in classes]  # ground-truth pixels of each class
    predicted = [sum(row[c] for row in counts) for c in classes]
    correct = [counts[c][c] for c in classes]
    iou = [correct[c] / (truth[c] + predicted[c] - correct[c])
           if truth[c] + predicted[c] else math.nan for c in classes]
    return {
        "pixel_accuracy": sum(correct) / total if total else math.nan,
        "mean_class_accuracy": mean_of_defined(
            [correct[c] / truth[c] if truth[c] else math.nan for c in classes]),
        "mean_iou": mean_of_defined(iou),
        "fw_iou": sum(truth[c] / total * iou[c] for c in classes if truth[c]) if total
        else math.nan,
        "per_class_iou": iou,
    }


def same(actual, expected):
    return (math.isnan(actual) and math.isnan(expected)) or actual == pytest.approx(expected)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_matrix_and_scores_equal_a_brute_force_count(case):
    num_classes, pairs = case
    evaluator = Evaluator(num_classes)
    for target, prediction in pairs:
        evaluator.add_batch(target, prediction)
    counts = brute_force_counts(num_classes, pairs)
    expected = brute_force_scores(counts)

    assert evaluator.confusion_matrix.tolist() == counts
    assert same(evaluator.pixel_accuracy(), expected["pixel_accuracy"])
    assert same(evaluator.mean_class_accuracy(), expected["mean_class_accuracy"])
    assert same(evaluator.mean_iou(), expected["mean_iou"])
    assert same(evaluator.frequency_weighted_iou(), expected["fw_iou"])
    for actual, wanted in zip(evaluator.per_class_iou().tolist(), expected["per_class_iou"]):
        assert same(actual, wanted)

    names = [f"class{c}" for c in range(num_classes)]
    results = evaluator.results(names)
    assert results["pixels"] == sum(map(sum, counts))
    assert results["confusion_matrix"] == counts
    for key in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "fw_iou"):
        assert (results[key] is None) == math.isnan(expected[key])
        assert results[key] is None or results[key] == pytest.approx(expected[key])
    for name, wanted in zip(names, expected["per_class_iou"]):
        got = results["per_class_iou"][name]
        assert (got is None and math.isnan(wanted)) or got == pytest.approx(wanted)
