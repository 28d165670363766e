#!/usr/bin/env python
"""How long turning the model's logits into class ids takes, against an ``argmax`` baseline.

:func:`modeling.inference_ops.predict_labels` resizes the model's stride-4 logits to the
output size strip by strip and reduces each strip over the classes. This times it on a stand-in
model that returns fixed random logits (so only the post-processing is timed), once as the
toolkit does it (``max(dim=1)``) and once with the reduction done by ``argmax(dim=1)``, in the
same process, alternating, best of ``--repeats``; and checks that both give the same ids.

    python -m bench.inference_ops                         # a 640x480 output, 21 classes
    python -m bench.inference_ops --out 480 640 --logits 30 40 --confidence
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from modeling import inference_ops


def argmax_ids(scores: torch.Tensor, *, probabilities: bool, dtype: torch.dtype,
               confidence: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reduction as it was written before: ``argmax``, then a ``gather`` of the maximum."""
    labels = scores.argmax(dim=1)
    if not confidence:
        return labels.to(dtype), None
    top = scores.gather(1, labels[:, None])
    chosen = top[:, 0] if probabilities else (scores - top).exp().sum(dim=1).reciprocal()
    return labels.to(dtype), chosen.mul(255).round_().to(torch.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inference_ops",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="output size (the photo's)")
    parser.add_argument("--logits", type=int, nargs=2, default=(120, 160), metavar=("H", "W"),
                        help="the model's logits' size (a quarter of its input's)")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--confidence", action="store_true", help="also the confidence map")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logits = torch.randn(1, args.classes, *args.logits, generator=torch.Generator().manual_seed(0))
    image = torch.zeros(1, 3, 4 * args.logits[0], 4 * args.logits[1])

    def model(_: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": logits}

    def run() -> torch.Tensor:
        return inference_ops.predict_labels(model, image, tuple(args.out), dtype=torch.uint8,
                                            with_confidence=args.confidence)

    results, best = {}, {"max (toolkit)": float("inf"), "argmax (baseline)": float("inf")}
    for round_ in range(args.repeats + 1):  # round 0 warms up and is not counted
        for name in best:
            patch = (mock.patch.object(inference_ops, "_ids", argmax_ids) if "argmax" in name
                     else mock.patch.object(inference_ops, "_ids", inference_ops._ids))
            with patch, torch.inference_mode():
                tic = time.perf_counter()
                results[name] = run()
                seconds = time.perf_counter() - tic
            if round_:
                best[name] = min(best[name], seconds)
    same = all(torch.equal(a, b) for a, b in zip(*(
        (found,) if isinstance(found, torch.Tensor) else found for found in results.values())))
    print(f"{args.classes} classes, logits {args.logits[0]}x{args.logits[1]} -> "
          f"{args.out[0]}x{args.out[1]}{', with confidence' if args.confidence else ''}; "
          f"torch threads {torch.get_num_threads()}; identical ids: {same}")
    baseline = best["argmax (baseline)"]
    for name, seconds in best.items():
        print(f"  {name:18s} {1000 * seconds:8.1f} ms  {baseline / seconds:5.2f}x")


if __name__ == "__main__":
    main()
