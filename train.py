#!/usr/bin/env python
"""Train and evaluate DeepLabV3+ (https://arxiv.org/abs/1802.02611).

    python train.py --backbone resnet --out-stride 16                   # one GPU, several, or CPU
    torchrun --nproc_per_node 8 train.py --backbone resnet              # DDP on one machine
    python train.py --eval-only --resume run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar

This script is the only place (with inference.py) that reads command-line flags; everything below
it takes plain keyword arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import mypath
from dataloader import custom_transforms as tr
from dataloader.class_weights import compute_class_weights
from dataloader.datasets import DATASETS, build_dataset
from dataloader.samplers import ResumableSampler, SeededDataset
from dataloader.utils import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    collate_skipping_bad,
)
from modeling.backbone import (
    BACKBONE_ALIASES,
    BACKBONES,
    PretrainedWeightsUnavailable,
    canonical_backbone_name,
)
from modeling.deeplab import DeepLab
from modeling.predict import predict_probabilities
from utils.distributed import (
    DistributedContext,
    any_true,
    barrier,
    broadcast_buffers,
    cleanup,
    init_distributed,
)
from utils.fileio import atomic_write_text
from utils.losses import LOSSES, build_loss
from utils.lr_scheduler import SCHEDULERS, build_lr_scheduler
from utils.metrics import Evaluator
from utils.saver import CheckpointError, Saver, get_rng_state, load_checkpoint, set_rng_state
from utils.summaries import TensorboardSummary

logger = logging.getLogger("train")

#: Epochs when --epochs is not given (torchvision's COCO recipe trains 30).
DEFAULT_EPOCHS = {"coco": 30, "cocostuff": 30, "pascal": 50, "folder": 50, "demo": 15}
#: Images per device when --batch-size is not given.
DEFAULT_BATCH_PER_DEVICE = 4
#: Linear scaling rule for --lr when it is not given: 0.01 for 16 images per step.
REFERENCE_LR, REFERENCE_BATCH = 0.01, 16


class UserError(Exception):
    """A mistake the user can fix (a flag, a path); reported as one line, exit status 2."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training stops without saving the bad weights."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train DeepLabV3+ for semantic segmentation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet101",
                       choices=sorted(BACKBONES) + sorted(BACKBONE_ALIASES),
                       help="ResNet depth; 'resnet' means resnet101")
    model.add_argument("--out-stride", type=int, default=16, choices=(8, 16),
                       help="output stride of the backbone (16: faster, 8: finer)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start the backbone from ImageNet weights (downloaded by torchvision)")
    model.add_argument("--backbone-weights", metavar="PATH",
                       help="local torchvision ResNet state dict to use instead of downloading")
    model.add_argument("--aux-loss", action=argparse.BooleanOptionalAction, default=False,
                       help="add an FCN auxiliary head on the stride-16 backbone stage")
    model.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary loss")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="coco", choices=sorted(DATASETS))
    data.add_argument("--data-root", help="dataset folder (overrides mypath.py and its variable)")
    data.add_argument("--workers", type=int, default=4, help="data loading processes per GPU")
    data.add_argument("--base-size", type=int, default=513,
                      help="short side before random scaling by 0.5-2.0")
    data.add_argument("--crop-size", type=int, default=513, help="square training crop")
    data.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                      help="skip unreadable images (counted per epoch) instead of stopping")
    data.add_argument("--cache-dir", help="where index caches and class weights are kept "
                      "(default: $DEEPLAB_CACHE_DIR or ~/.cache/deeplab)")
    data.add_argument("--use-balanced-weights", action=argparse.BooleanOptionalAction,
                      default=False, help="weight the loss by inverse log class frequency")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="default: by dataset, " + ", ".join(
        f"{k} {v}" for k, v in sorted(DEFAULT_EPOCHS.items())))
    optim.add_argument("--batch-size", type=int,
                       help=f"images per step in this process (default {DEFAULT_BATCH_PER_DEVICE}"
                            " per GPU used by it)")
    optim.add_argument("--lr", type=float, help=f"backbone learning rate; the head gets 10x "
                       f"(default {REFERENCE_LR} x total batch / {REFERENCE_BATCH})")
    optim.add_argument("--lr-scheduler", default="poly", choices=SCHEDULERS)
    optim.add_argument("--lr-step", type=int, default=10, help="epochs between step decays")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="step decay factor")
    optim.add_argument("--warmup-iters", type=int, default=0, help="linear warm-up iterations")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--loss-type", default="ce", choices=LOSSES)
    optim.add_argument("--focal-gamma", type=float, default=2.0)

    hw = parser.add_argument_group("hardware")
    hw.add_argument("--no-cuda", action="store_true", help="train on the CPU even with a GPU")
    hw.add_argument("--gpu-ids", default=None,
                    help="comma-separated GPUs for DataParallel, e.g. 0,1 (default: all)")
    hw.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                    help="mixed precision; auto: bf16 where supported, else fp16 on GPU, else off")
    hw.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last memory format (default: on for GPUs)")
    hw.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the model")
    hw.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                    help="SyncBatchNorm across processes (default: on with torchrun, >1 process "
                         "and GPUs)")

    run = parser.add_argument_group("run")
    run.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    run.add_argument("--ft", action="store_true",
                     help="with --resume: fine-tune from its weights only (new optimiser, epoch 0)")
    run.add_argument("--checkname", help="run name (default deeplab-<backbone>)")
    run.add_argument("--run-root", default="run", help="folder holding all runs")
    run.add_argument("--run-dir", help="exact experiment folder (default: next experiment_<k>)")
    run.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs")
    run.add_argument("--eval-only", action="store_true", help="evaluate --resume and exit")
    run.add_argument("--eval-size", type=int,
                     help="resize the short side of val inputs (labels stay full size)")
    run.add_argument("--eval-scales", type=float, nargs="+", default=[1.0],
                     help="multi-scale testing: input scales whose softmax is averaged")
    run.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, default=False,
                     help="also average horizontally flipped inputs")
    run.add_argument("--eval-json", help="where --eval-only writes its metrics "
                     "(default: eval_metrics.json beside the checkpoint)")
    run.add_argument("--save-interval", type=int, default=0,
                     help="also save the latest checkpoint every N iterations (0: per epoch)")
    run.add_argument("--print-freq", type=int, default=20,
                     help="iterations between progress updates, TensorBoard writes and NaN "
                          "checks (every iteration's loss is logged)")
    run.add_argument("--seed", type=int, default=1)
    return parser


# --------------------------------------------------------------------------- set-up helpers


@dataclass
class Hardware:
    device: torch.device
    gpu_ids: list[int]  # DataParallel devices in this process (empty on CPU)
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def devices_per_process(self) -> int:
        return max(len(self.gpu_ids), 1)

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's images (in the chosen memory format) and labels, on the device."""
        images = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["label"].to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)


def _cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Map --amp to an autocast dtype (None = full precision)."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on the CPU")
    if amp == "bf16" or (amp == "auto" and _cpu_supports_bf16()):
        return torch.bfloat16
    return None


def resolve_hardware(
    no_cuda: bool, gpu_ids: str | None, amp: str, channels_last: bool | None,
    context: DistributedContext,
) -> Hardware:
    use_cuda = torch.cuda.is_available() and not no_cuda
    if context.enabled:
        device = torch.device("cuda", context.local_rank) if use_cuda else torch.device("cpu")
        ids = [context.local_rank] if use_cuda else []
    elif use_cuda:
        available = torch.cuda.device_count()
        try:
            ids = list(range(available)) if gpu_ids is None else [
                int(i) for i in gpu_ids.split(",") if i.strip()]
        except ValueError:
            raise UserError(f"--gpu-ids {gpu_ids!r} is not a comma-separated list of integers")
        bad = [i for i in ids if not 0 <= i < available]
        if bad or not ids:
            raise UserError(f"--gpu-ids {gpu_ids} names GPUs {bad}, but this machine has "
                            f"{available} (ids 0-{available - 1})")
        device = torch.device("cuda", ids[0])
    else:
        device, ids = torch.device("cpu"), []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Hardware(
        device=device,
        gpu_ids=ids,
        amp_dtype=resolve_amp(amp, device),
        channels_last=device.type == "cuda" if channels_last is None else channels_last,
    )


def run_settings(model: DeepLab, class_names: list[str], palette: list[list[int]]) -> dict:
    """What inference.py and --eval-only need to rebuild and use the model: plain types only."""
    return dict(
        model.settings(),
        class_names=list(class_names),
        palette=[[int(c) for c in color] for color in palette],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )


def load_finetune_weights(model: DeepLab, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load weights for fine-tuning; classifier layers whose shape differs are re-initialised.

    Returns the names of the re-initialised tensors. Any other mismatch is a UserError.
    """
    own = model.state_dict()
    reinit = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    classifier = set(model.classifier_parameter_names())
    not_classifier = [k for k in reinit if k not in classifier]
    if not_classifier:
        raise UserError(f"--ft checkpoint does not match this model ({not_classifier[0]} "
                        f"{tuple(state_dict[not_classifier[0]].shape)} vs "
                        f"{tuple(own[not_classifier[0]].shape)}): use the same --backbone")
    filtered = {k: v for k, v in state_dict.items() if k not in reinit}
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    missing = [k for k in missing if k not in reinit]
    if missing or unexpected:
        raise UserError(f"--ft checkpoint does not match this model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): use the same --backbone and --aux-loss")
    return reinit


# --------------------------------------------------------------------------- train / evaluate


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    iteration: int = 0  # optimiser steps completed since the start of training
    best_pred: float = 0.0  # best val mIoU so far


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves and exits at the next iteration boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum


class LossWindow:
    """Per-iteration losses kept on the device until the next log point, so that the NaN check
    and per-iteration TensorBoard scalars cost one host-device synchronisation per window."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.entries.append((step, loss.detach().float(), lr))

    def drain(self) -> list[tuple[int, float, float]]:
        """``(step, loss, lr)`` of every iteration since the last drain.

        Raises:
            NonFiniteLoss: naming the first iteration whose loss is NaN or infinite.
        """
        if not self.entries:
            return []
        values = torch.stack([loss for _, loss, _ in self.entries]).cpu().tolist()
        entries = [(step, value, lr) for (step, _, lr), value in zip(self.entries, values)]
        self.entries = []
        for step, value, _ in entries:
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at iteration {step}")
        return entries


def train_one_epoch(
    *,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    loader: torch.utils.data.DataLoader,
    hardware: Hardware,
    state: TrainState,
    iters_per_epoch: int,
    aux_weight: float,
    print_freq: int,
    save_interval: int,
    save: Any,
    summary: TensorboardSummary | None,
    stop: StopFlag,
    context: DistributedContext,
    show_progress: bool,
) -> int:
    """Run the rest of epoch ``state.epoch``; returns how many bad samples were skipped."""
    model.train()
    window = LossWindow()
    skipped = 0
    images_seen = 0
    tic = time.perf_counter()
    progress = tqdm(loader, desc=f"epoch {state.epoch}", disable=not show_progress,
                    initial=state.iteration % iters_per_epoch, total=iters_per_epoch,
                    dynamic_ncols=True)

    def log_window() -> None:
        # Also before every save: weights a NaN has reached are never written.
        nonlocal images_seen, tic
        entries = window.drain()
        if entries and summary is not None:
            for step, value, lr in entries:
                summary.add_scalar("train/loss", value, step)
                summary.add_scalar("train/lr", lr, step)
            elapsed = time.perf_counter() - tic
            summary.add_scalar("train/images_per_second",
                               images_seen * context.world_size / max(elapsed, 1e-9),
                               state.iteration)
            progress.set_postfix(loss=f"{entries[-1][1]:.4f}")
        images_seen, tic = 0, time.perf_counter()

    for batch in progress:
        skipped += int(batch["skipped"])
        # BatchNorm in the image-pooling branch needs two samples per device.
        if "image" in batch and len(batch["image"]) >= 2 * hardware.devices_per_process:
            images, targets = hardware.inputs(batch)
            with hardware.autocast():
                outputs = model(images)
                loss = criterion(outputs["out"].float(), targets)
                if "aux" in outputs:
                    loss = loss + aux_weight * criterion(outputs["aux"].float(), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            window.add(state.iteration + 1, loss, optimizer.param_groups[0]["lr"])
            images_seen += len(images)
        scheduler.step()
        state.iteration += 1

        at_epoch_end = state.iteration % iters_per_epoch == 0
        at_log_point = state.iteration % print_freq == 0 or at_epoch_end
        if at_log_point:
            log_window()
        if save_interval and state.iteration % save_interval == 0 and not at_epoch_end:
            log_window()
            save(is_best=False)
        # One process reads its flag for free; under DDP all ranks must agree to stop at the same
        # iteration, which costs a collective, so they compare flags at log points only.
        if (stop.signum is not None if not context.enabled else
                at_log_point and any_true(stop.signum is not None, context, hardware.device)):
            log_window()
            save(is_best=False)
            raise Interrupted(stop.signum or signal.SIGTERM)
    return skipped


@torch.no_grad()
def evaluate(
    *,
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    hardware: Hardware,
    scales: list[float],
    flip: bool,
    show_progress: bool,
) -> tuple[Evaluator, dict | None]:
    """Score full-resolution predictions on every val image (summed over ranks).

    Returns the evaluator and, for the TensorBoard grid, the first batch's tensors.
    """
    model.eval()
    evaluator = Evaluator(num_classes, device=hardware.device)
    first = None
    for batch in tqdm(loader, desc="val", disable=not show_progress, dynamic_ncols=True):
        if "image" not in batch:
            continue
        image, target = hardware.inputs(batch)
        with hardware.autocast():
            probabilities = predict_probabilities(model, image, tuple(target.shape[-2:]),
                                                  scales, flip)
        prediction = probabilities.argmax(dim=1)
        evaluator.add_batch(target, prediction)
        if first is None:
            first = {"image": F.interpolate(image.float(), size=tuple(target.shape[-2:]),
                                            mode="bilinear", align_corners=False).cpu(),
                     "target": target.cpu(), "prediction": prediction.cpu()}
    evaluator.all_reduce()
    return evaluator, first


# --------------------------------------------------------------------------- main


def _data_root(dataset: str, data_root: str | None) -> str:
    if data_root:
        if dataset != "demo" and not os.path.isdir(data_root):
            raise UserError(f"--data-root {data_root} does not exist")
        return data_root
    try:
        return mypath.db_root_dir(dataset, must_exist=dataset != "demo")
    except FileNotFoundError as error:
        raise UserError(str(error)) from None


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGINT/SIGTERM to the training process, which saves a checkpoint and
    shuts them down; a worker killed by Ctrl-C first would abort the run before it can save."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(dataset, *, batch_size: int, shuffle: bool, seed: int, context: DistributedContext,
            workers: int, pin_memory: bool, drop_last: bool) -> tuple[Any, ResumableSampler]:
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=context.rank,
                               world_size=context.world_size, drop_uneven=drop_last)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate_skipping_bad,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        # A private generator: creating an iterator must not consume the global RNG, or a
        # resumed run's dropout would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def main(args: argparse.Namespace) -> dict:
    """Train (or with ``--eval-only`` evaluate) as the flags say; returns a summary dict."""
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda)
    try:
        return _main(args, context)
    finally:
        cleanup(context)


def _main(args: argparse.Namespace, context: DistributedContext) -> dict:
    is_main = context.is_main
    hardware = resolve_hardware(args.no_cuda, args.gpu_ids, args.amp, args.channels_last,
                                context)
    torch.manual_seed(args.seed)
    if args.ft and not args.resume:
        raise UserError("--ft needs --resume CKPT: the checkpoint to fine-tune from")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume CKPT: the checkpoint to evaluate")
    if any(s <= 0 for s in args.eval_scales):
        raise UserError(f"--eval-scales must be positive, got {args.eval_scales}")
    checkpoint = None
    if args.resume:
        try:
            checkpoint = load_checkpoint(args.resume, map_location="cpu",
                                         required_keys=("model", "settings"))
        except CheckpointError as error:
            raise UserError(f"--resume: {error}") from None

    root = _data_root(args.dataset, args.data_root)
    if is_main and args.dataset == "demo":
        logger.info("demo dataset: %s", root)
    # Rank 0 first: it may generate the demo data or write index caches the others then read.
    if not is_main:
        barrier(context)
    val_set = build_dataset(args.dataset, root, "val",
                            transform=tr.eval_transform(args.eval_size),
                            skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir)
    train_set = None
    if not args.eval_only:
        train_set = build_dataset(args.dataset, root, "train",
                                  transform=tr.train_transform(args.base_size, args.crop_size),
                                  skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir)
    if is_main:
        barrier(context)
    class_names = list(val_set.class_names)
    num_classes = len(class_names)

    # ---- model
    if checkpoint is not None and not args.ft:
        settings = checkpoint["settings"]
        if settings["num_classes"] != num_classes:
            raise UserError(f"--resume checkpoint has {settings['num_classes']} classes but "
                            f"--dataset {args.dataset} has {num_classes}: use --ft to fine-tune")
        model = DeepLab.from_settings(settings)
        model.load_state_dict(checkpoint["model"])
    else:
        try:
            model = DeepLab(
                backbone=canonical_backbone_name(args.backbone),
                output_stride=args.out_stride,
                num_classes=num_classes,
                aux_loss=args.aux_loss,
                pretrained_backbone=args.pretrained and not args.ft,
                backbone_weights=args.backbone_weights,
            )
        except PretrainedWeightsUnavailable as error:
            raise UserError(f"{error}; pass --no-pretrained to train from scratch, or "
                            f"--backbone-weights PATH with a local torchvision ResNet state "
                            f"dict") from None
        except FileNotFoundError as error:
            raise UserError(f"--backbone-weights: {error}") from None
        if args.ft:
            reinit = load_finetune_weights(model, checkpoint["model"])
            if reinit and is_main:
                print(f"fine-tuning: re-initialised {', '.join(reinit)} (class count "
                      f"{checkpoint['settings']['num_classes']} -> {num_classes})")
    settings = run_settings(model, class_names, val_set.palette)
    # Same initial weights on every rank (DDP also broadcasts them), different dropout masks.
    torch.manual_seed(args.seed + context.rank)

    # PyTorch's SyncBatchNorm runs on GPUs only; CPU processes keep per-process statistics
    # (DDP still broadcasts rank 0's running statistics, so the ranks stay identical).
    on_gpu = hardware.device.type == "cuda"
    sync_bn = args.sync_bn if args.sync_bn is not None else context.enabled and on_gpu
    if sync_bn and not on_gpu:
        raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm is CUDA-only): "
                        "drop it on CPUs")
    if sync_bn and context.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    plain_model = model  # evaluation and checkpoints use the unwrapped model
    if context.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=hardware.gpu_ids or None)
    elif len(hardware.gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=hardware.gpu_ids)
    if args.compile:
        model = torch.compile(model)

    # ---- val loader (batch 1: full-resolution labels differ in size)
    val_loader, _ = _loader(val_set, batch_size=1, shuffle=False, seed=args.seed,
                            context=context, workers=args.workers,
                            pin_memory=hardware.device.type == "cuda", drop_last=False)

    if args.eval_only:
        evaluator, _ = evaluate(model=plain_model, loader=val_loader, num_classes=num_classes,
                                hardware=hardware, scales=args.eval_scales,
                                flip=args.eval_flip, show_progress=is_main)
        results = evaluator.results(class_names)
        if is_main:
            print(evaluator.format_table(class_names))
            path = args.eval_json or os.path.join(os.path.dirname(os.path.abspath(args.resume)),
                                                  "eval_metrics.json")
            atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
            print(f"metrics written to {path}")
        return {"metrics": results}

    # ---- training set-up
    devices = hardware.devices_per_process
    batch_size = args.batch_size or DEFAULT_BATCH_PER_DEVICE * devices
    if batch_size < 2 * devices:
        raise UserError(f"--batch-size {batch_size} gives fewer than 2 images per device on "
                        f"{devices} device(s); BatchNorm in ASPP's image pooling needs 2: use "
                        f"--batch-size {2 * devices} or more")
    total_batch = batch_size * context.world_size
    lr = args.lr if args.lr is not None else REFERENCE_LR * total_batch / REFERENCE_BATCH
    epochs = args.epochs or DEFAULT_EPOCHS[args.dataset]
    train_loader, train_sampler = _loader(
        train_set, batch_size=batch_size, shuffle=True, seed=args.seed, context=context,
        workers=args.workers, pin_memory=hardware.device.type == "cuda", drop_last=True)
    iters_per_epoch = len(train_set) // context.world_size // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"the {args.dataset} train split has {len(train_set)} images, fewer "
                        f"than one batch of {total_batch}: lower --batch-size")
    total_iters = epochs * iters_per_epoch

    weight = None
    if args.use_balanced_weights:
        if not is_main:
            barrier(context)
        weight = compute_class_weights(train_set, num_classes, cache_dir=args.cache_dir)
        if is_main:
            barrier(context)
        weight = weight.to(hardware.device)
    criterion = build_loss(args.loss_type, ignore_index=IGNORE_INDEX, weight=weight,
                           gamma=args.focal_gamma)
    optimizer = torch.optim.SGD(
        [{"params": list(plain_model.backbone_parameters()), "lr": lr},
         {"params": list(plain_model.head_parameters()), "lr": lr * 10}],
        lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)
    if args.lr_scheduler == "step" and args.lr_step <= 0:
        raise UserError(f"--lr-step must be a positive number of epochs, got {args.lr_step}")
    scheduler = build_lr_scheduler(
        optimizer, args.lr_scheduler, total_iters=total_iters, warmup_iters=args.warmup_iters,
        step_size=args.lr_step * iters_per_epoch, gamma=args.lr_gamma)
    scaler = (torch.amp.GradScaler(hardware.device.type)
              if hardware.amp_dtype == torch.float16 else None)

    state = TrainState()
    if checkpoint is not None and not args.ft:
        if checkpoint.get("iters_per_epoch") != iters_per_epoch:
            raise UserError(f"--resume checkpoint ran {checkpoint.get('iters_per_epoch')} "
                            f"iterations per epoch, this set-up {iters_per_epoch}: keep "
                            f"--batch-size, the number of processes and the dataset")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(epoch=checkpoint["iteration"] // iters_per_epoch,
                           iteration=checkpoint["iteration"], best_pred=checkpoint["best_pred"])
        set_rng_state(checkpoint["rng"])  # rank 0's states: exact for one process
        if context.rank:
            torch.manual_seed(args.seed + context.rank + state.iteration)

    checkname = args.checkname or f"deeplab-{settings['backbone']}"
    experiment_dir = args.run_dir or (
        os.path.dirname(os.path.abspath(args.resume)) if checkpoint is not None and not args.ft
        else None)
    saver = summary = None
    if is_main:
        saver = Saver(run_root=args.run_root, dataset=args.dataset, checkname=checkname,
                      experiment_dir=experiment_dir)
        resolved = dict(vars(args), batch_size=batch_size, lr=lr, epochs=epochs,
                        iters_per_epoch=iters_per_epoch, total_iters=total_iters,
                        world_size=context.world_size, sync_bn=sync_bn,
                        amp_dtype=str(hardware.amp_dtype), device=str(hardware.device),
                        model=settings)
        saver.save_settings(resolved)
        # Events of a killed run past its checkpoint are dropped by readers (purge_step), so
        # each step appears once; events up to the checkpoint were flushed before it was saved.
        summary = TensorboardSummary(saver.experiment_dir,
                                     purge_step=state.iteration + 1 if state.iteration else None)
        print(f"run folder: {saver.experiment_dir}")
        print(f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes; "
              f"{epochs} epochs x {iters_per_epoch} iterations of {total_batch} images; "
              f"lr {lr:g} (head {10 * lr:g}), {args.lr_scheduler}; device {hardware.device}"
              f"{' x' + str(len(hardware.gpu_ids)) if len(hardware.gpu_ids) > 1 else ''}, "
              f"{context.world_size} process(es), amp {hardware.amp_dtype}")

    def save(is_best: bool) -> None:
        if saver is None:
            return
        summary.flush()
        saver.save({
            "model": plain_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch,
            "iteration": state.iteration,
            "iters_per_epoch": iters_per_epoch,
            "best_pred": state.best_pred,
            "rng": get_rng_state(),
            "settings": settings,
        }, is_best=is_best)

    stop = StopFlag()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    last_results: dict | None = None
    try:
        while state.iteration < total_iters:
            state.epoch = state.iteration // iters_per_epoch
            train_sampler.set_epoch(state.epoch, start=(state.iteration % iters_per_epoch)
                                    * batch_size)
            skipped = train_one_epoch(
                model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, loader=train_loader, hardware=hardware, state=state,
                iters_per_epoch=iters_per_epoch, aux_weight=args.aux_weight,
                print_freq=max(args.print_freq, 1), save_interval=args.save_interval,
                save=save, summary=summary, stop=stop, context=context,
                show_progress=is_main)
            if skipped and is_main:
                print(f"epoch {state.epoch}: skipped {skipped} bad samples (--skip-bad-images)")
            is_best = False
            last_epoch = state.iteration >= total_iters
            broadcast_buffers(plain_model, context)
            if (state.epoch + 1) % max(args.eval_interval, 1) == 0 or last_epoch:
                evaluator, first = evaluate(model=plain_model, loader=val_loader,
                                            num_classes=num_classes, hardware=hardware,
                                            scales=args.eval_scales, flip=args.eval_flip,
                                            show_progress=is_main)
                last_results = evaluator.results(class_names)
                miou = last_results["mean_iou"]  # None when nothing could be scored
                is_best = miou is not None and miou > state.best_pred
                if is_best:
                    state.best_pred = miou
                if is_main:
                    print(f"epoch {state.epoch} (iteration {state.iteration}):")
                    print(evaluator.format_table(class_names))
                    summary.log_metrics(last_results, state.iteration, class_names)
                    if first is not None:
                        summary.visualize(first["image"], first["target"], first["prediction"],
                                          palette=settings["palette"], mean=IMAGENET_MEAN,
                                          std=IMAGENET_STD, step=state.iteration)
                    atomic_write_text(
                        os.path.join(saver.experiment_dir, "metrics.json"),
                        json.dumps(dict(last_results, epoch=state.epoch, iteration=state.iteration),
                                   indent=2, sort_keys=True))
            save(is_best=is_best)
            if summary is not None:
                summary.flush()
        if context.enabled:
            check_ranks_in_sync(plain_model, context)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if summary is not None:
            summary.close()
    if is_main:
        print(f"done: best mIoU {100 * state.best_pred:.2f}; checkpoints in "
              f"{saver.experiment_dir}")
    return {
        "iteration": state.iteration,
        "best_pred": state.best_pred,
        "metrics": last_results,
        "experiment_dir": saver.experiment_dir if saver else None,
        "lr": optimizer.param_groups[0]["lr"],
    }


def check_ranks_in_sync(model: nn.Module, context: DistributedContext) -> None:
    """Compare every parameter and buffer across ranks; DDP must have kept them identical."""
    import torch.distributed as dist

    local = torch.stack([t.detach().double().sum() for t in model.state_dict().values()
                         if t.is_floating_point()])
    gathered = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(gathered, local)
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if context.is_main:
        print(f"weights identical across {context.world_size} ranks: {'yes' if same else 'NO'}")
    if not same:
        raise RuntimeError("model weights differ across ranks after training")


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (UserError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}; training stopped, the last good checkpoint is kept "
              f"(try a lower --lr or --amp off)", file=sys.stderr)
        return 3
    except Interrupted as error:
        print(f"interrupted by {error}: checkpoint saved; continue with --resume",
              file=sys.stderr)
        return 128 + error.signum
    except torch.cuda.OutOfMemoryError:
        print("error: GPU out of memory: lower --batch-size or --crop-size, or use --amp bf16/"
              "fp16, --out-stride 16 or a smaller --backbone", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(cli())
