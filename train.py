#!/usr/bin/env python
"""Train and evaluate DeepLabV3+ (https://arxiv.org/abs/1802.02611).

    python train.py --backbone resnet --out-stride 16                   # one GPU, several, or CPU
    torchrun --nproc_per_node 8 train.py --backbone resnet              # DDP on one machine
    python train.py --eval-only --resume run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar

Only the scripts read command-line flags. ``main`` shows a run: the builders, then each epoch
trains (:func:`train_one_epoch`), evaluates when due (:func:`evaluate`) and saves. Device and
precision come from utils/hardware.py, the plan of the run from utils/plan.py, checkpoints from
utils/saver.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import mypath
from dataloader import custom_transforms as tr
from dataloader.check import check_datasets
from dataloader.class_weights import compute_class_weights
from dataloader.datasets import DATASETS, build_dataset
from dataloader.samplers import ResumableSampler, resumable_loader
from dataloader.utils import IGNORE_INDEX, DatasetError
from modeling.backbone import (BACKBONE_ALIASES, BACKBONES, PretrainedWeightsUnavailable,
                               canonical_backbone_name)
from modeling.deeplab import DeepLab
from modeling.predict import predict_labels
from modeling.pretrained import (coco_deeplabv3_state_dict, coco_deeplabv3_weights,
                                 init_from_torchvision_deeplabv3)
from utils.distributed import (DEFAULT_TIMEOUT_MINUTES, DistributedContext, any_true,
                               any_true_each, broadcast_buffers, cleanup, init_distributed,
                               launch_context, main_process_first, ranks_in_sync)
from utils.errors import UserError
from utils.fileio import atomic_write_text
from utils.hardware import (Hardware, add_hardware_args, backward_kernels, cpu_bf16_note,
                            cudnn_benchmark, prepare_model, resolve_hardware, usable_batch_size)
from utils.losses import LOSSES, NonFiniteLoss, OutputsLoss, build_loss
from utils.lr_scheduler import SCHEDULERS, build_lr_scheduler
from utils.figures import evaluation_figures, save_figures
from utils.metrics import Evaluator, WorstImages, metrics_json
from utils.optim import Optimisation, build_optimizer, grad_scaler
from utils.plan import DEFAULT_BATCH_PER_DEVICE, REFERENCE_BATCH, REFERENCE_LR, TrainPlan, \
    plan_training
from utils.saver import (CHECKPOINT_NAME, SETTINGS_NAME, Checkpointer, CheckpointError, Saver,
                         TrainState, load_checkpoint, restore_training_state)
from utils.signals import Interrupted, StopFlag
from utils.slurm import DEFAULT_REQUEUE_SIGNAL, parse_signal, requeue_job
from utils.summaries import TensorboardSummary, TrainLog

logger = logging.getLogger("train")

#: Epochs when --epochs is not given (torchvision's COCO recipe trains 30).
DEFAULT_EPOCHS = {"coco": 30, "cocostuff": 30, "pascal": 50, "folder": 50, "demo": 15}
#: --init value that downloads torchvision's COCO DeepLabV3 (any other value is a local file).
INIT_TORCHVISION_COCO = "torchvision-coco"


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train DeepLabV3+ for semantic segmentation",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add_group in (_model_args, _data_args, _optimisation_args, _hardware_args, _run_args):
        add_group(parser)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet101", choices=sorted(BACKBONES) + sorted(
        BACKBONE_ALIASES), help="ResNet depth; 'resnet' means resnet101")
    model.add_argument("--out-stride", type=int, default=16, choices=(8, 16),
                       help="output stride of the backbone (16: faster, 8: finer)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start the backbone from ImageNet weights (downloaded by torchvision)")
    model.add_argument("--backbone-weights", metavar="PATH",
                       help="local torchvision ResNet state dict to use instead of downloading")
    model.add_argument("--init", metavar=f"{INIT_TORCHVISION_COCO}|PATH", help="start backbone, "
                       "ASPP, aux head from torchvision's COCO DeepLabV3 (resnet50/101; download "
                       "or state dict file)")
    model.add_argument("--aux-loss", action=argparse.BooleanOptionalAction, default=False,
                       help="add an FCN auxiliary head on the stride-16 backbone stage")
    model.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary loss")


def _data_args(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="coco", choices=sorted(DATASETS))
    data.add_argument("--data-root", help="dataset folder (overrides mypath.py and its variable)")
    data.add_argument("--workers", type=int, default=4, help="data loading processes per GPU")
    data.add_argument("--base-size", type=int, default=513, help="short side before 0.5-2x scaling")
    data.add_argument("--crop-size", type=int, default=513, help="square training crop")
    data.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                      help="skip unreadable images (counted per epoch) instead of stopping")
    data.add_argument("--cache-dir", help="where index caches and class weights are kept "
                      "(default: $DEEPLAB_CACHE_DIR or ~/.cache/deeplab)")
    data.add_argument("--use-balanced-weights", action=argparse.BooleanOptionalAction,
                      default=False, help="weight the loss by inverse log class frequency")
    data.add_argument("--check-data", action="store_true", help="read every train and val sample, "
                      "list the bad ones and the class pixel histogram, exit (1: bad data)")


def _optimisation_args(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="default: by dataset, " + ", ".join(
        f"{k} {v}" for k, v in sorted(DEFAULT_EPOCHS.items())))
    optim.add_argument("--batch-size", type=int, help=f"images per step in this process "
                       f"(default {DEFAULT_BATCH_PER_DEVICE} per GPU used by it)")
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


def _hardware_args(parser: argparse.ArgumentParser) -> None:
    hw = parser.add_argument_group("hardware")
    add_hardware_args(hw, channels_last=None)
    hw.add_argument("--gpu-ids", help="GPUs for DataParallel, e.g. 0,1 (default: all)")
    hw.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                    help="minutes a torchrun rank may wait in a collective before failing")
    hw.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                    help="SyncBatchNorm across processes (default: on under torchrun on GPUs)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    run.add_argument("--auto-resume", action="store_true", help="continue from the checkpoint of "
                     "--run-dir (or the newest experiment) if any, else start there")
    run.add_argument("--ft", action="store_true",
                     help="with --resume: fine-tune from its weights only (new optimiser, epoch 0)")
    run.add_argument("--checkname", help="run name (default deeplab-<backbone>)")
    run.add_argument("--run-root", default="run", help="folder holding all runs")
    run.add_argument("--run-dir", help="exact experiment folder (default: next experiment_<k>)")
    run.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs")
    run.add_argument("--eval-only", action="store_true", help="evaluate --resume and exit")
    run.add_argument("--eval-size", type=int, help="short side of val inputs (labels: full size)")
    run.add_argument("--eval-scales", type=float, nargs="+", default=[1.0],
                     help="multi-scale testing: input scales whose softmax is averaged")
    run.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, default=False,
                     help="also average horizontally flipped inputs")
    run.add_argument("--eval-json", help="where --eval-only writes its metrics "
                     "(default: eval_metrics.json beside the checkpoint)")
    run.add_argument("--eval-worst", type=int, default=8, metavar="K",
                     help="draw the K val images with the lowest mIoU after each evaluation, "
                          "beside the confusion matrix and per-class IoU figures (0: none)")
    run.add_argument("--save-interval", type=int, default=0,
                     help="also save the latest checkpoint every N iterations (0: per epoch)")
    run.add_argument("--print-freq", type=int, default=20,
                     help="iterations between progress updates, TensorBoard writes and NaN "
                          "checks (every iteration's loss is logged)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--requeue-signal", type=parse_signal, metavar="SIGNAL",
                     default=DEFAULT_REQUEUE_SIGNAL.name, help="save at the next step, requeue "
                     "the SLURM job (scontrol requeue) and exit on this signal (sbatch "
                     "--signal=USR1@120); SIGTERM saves and exits without requeueing")


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before anything is built."""
    if args.ft and not args.resume:
        raise UserError("--ft needs --resume CKPT: the checkpoint to fine-tune from")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume CKPT: the checkpoint to evaluate")
    if args.eval_worst < 0:
        raise UserError(f"--eval-worst must be 0 (off) or a number of images, got "
                        f"{args.eval_worst}")
    if any(s <= 0 for s in args.eval_scales):
        raise UserError(f"--eval-scales must be positive, got {args.eval_scales}")
    if args.lr_scheduler == "step" and args.lr_step <= 0:
        raise UserError(f"--lr-step must be a positive number of epochs, got {args.lr_step}")
    if args.init and args.resume:
        raise UserError("--init starts a new model, --resume continues one: drop one of them "
                        "(to fine-tune a checkpoint, use --resume CKPT --ft)")
    if args.init:
        try:
            coco_deeplabv3_weights(args.backbone)
        except ValueError as error:
            raise UserError(f"--init: {error}: use --backbone resnet50 or resnet101") from None
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value} (leave it out for the "
                            f"default)")
    for flag, folder in (("--run-dir", args.run_dir), ("--run-root", args.run_root)):
        if folder:
            check_folder_path(flag, folder)


def check_folder_path(flag: str, folder: str) -> None:
    """A folder that exists or can be created: no file where a folder on its path should be."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder: pick another "
                        f"{flag}")


# --------------------------------------------------------------------------- the steps of a run


def auto_resume(args: argparse.Namespace) -> argparse.Namespace:
    """``--auto-resume``: the flags with ``--resume`` set to the run folder's checkpoint (no
    ``--ft``: that was the first start's), or ``--run-dir`` set to the folder to start in."""
    if not args.auto_resume:
        return args
    checkname = args.checkname or f"deeplab-{canonical_backbone_name(args.backbone)}"
    folder = args.run_dir or Saver.latest_experiment_dir(
        os.path.join(args.run_root, args.dataset, checkname))
    if folder is not None and os.path.isfile(os.path.join(folder, CHECKPOINT_NAME)):
        return argparse.Namespace(**dict(vars(args), resume=os.path.join(folder, CHECKPOINT_NAME),
                                         ft=False, run_dir=str(folder)))
    return argparse.Namespace(**dict(vars(args), run_dir=folder and str(folder)))


def check_run_folder(args: argparse.Namespace) -> None:
    """Refuse to write into a folder whose latest checkpoint is not the one this run continues:
    a new run (or ``--ft``) would replace another run's ``model_best`` and repeat its TensorBoard
    steps, and ``--resume .../model_best.pth.tar`` would replace the newer checkpoint.pth.tar
    beside it (and hide the later TensorBoard events)."""
    resumed = bool(args.resume) and not args.ft
    folder = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if resumed else None)
    if args.eval_only or folder is None:
        return
    latest = Path(folder) / CHECKPOINT_NAME
    if not latest.is_file() or (resumed and (not os.path.isfile(args.resume) or
                                             latest.samefile(args.resume))):
        return  # a new folder, or the run's own checkpoint (a missing --resume: reported later)
    if resumed:
        raise UserError(f"--resume {args.resume} would continue in {folder} and replace the "
                        f"{CHECKPOINT_NAME} there: resume {latest} to continue that run, or add "
                        f"--run-dir NEW_FOLDER to continue from {os.path.basename(args.resume)} "
                        f"in a folder of its own")
    raise UserError(f"--run-dir {folder} already holds a run ({CHECKPOINT_NAME}): continue it "
                    f"with --resume {latest} (or --auto-resume), or pick a new --run-dir")


#: Settings a requeued ``--auto-resume`` command may change: where things are, how fast and how
#: often it reports, and the run's length. Any other difference is another experiment.
REQUEUE_MAY_CHANGE = frozenset({
    "resume", "auto_resume", "ft", "run_dir", "run_root", "checkname", "epochs", "total_iters",
    "data_root", "cache_dir", "workers", "print_freq", "save_interval", "dist_timeout",
    "eval_json", "eval_only", "check_data", "no_cuda", "gpu_ids", "amp", "amp_dtype", "device",
    "compile", "channels_last", "model"})


def check_requeued_settings(args: argparse.Namespace, run_settings: dict) -> None:
    """``--auto-resume`` continues only the run whose folder it found: the settings.json there
    must agree with this command's but for :data:`REQUEUE_MAY_CHANGE` (an explicit ``--resume``
    applies changed flags instead, with a warning)."""
    if not (args.auto_resume and args.resume):
        return
    folder = os.path.dirname(os.path.abspath(args.resume))
    try:
        previous = json.loads(Path(folder, SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return  # nothing to compare with (a folder from before settings.json)
    current = json.loads(json.dumps(run_settings, default=os.fspath))
    differing = [f"{'--' + key.replace('_', '-') if key in vars(args) else key} "
                 f"{json.dumps(previous[key])} -> {json.dumps(current[key])}"
                 for key in sorted(current) if key not in REQUEUE_MAY_CHANGE and key in previous
                 and previous[key] != current[key]]
    if differing:
        raise UserError(f"--auto-resume found {folder}, a run with other settings "
                        f"({', '.join(differing)}): repeat its flags to continue it, or give "
                        f"another --run-dir or --checkname to start a new run")


def read_checkpoint(path: str | None) -> dict | None:
    """The ``--resume`` checkpoint (loaded safely, on the CPU), or None."""
    if not path:
        return None
    try:
        return load_checkpoint(path, map_location="cpu", required_keys=("model", "settings"))
    except CheckpointError as error:
        raise UserError(f"--resume: {error}") from None


def build_datasets(args: argparse.Namespace, context: DistributedContext) -> tuple[Any, Any]:
    """``(train set or None with --eval-only, val set)``."""
    try:
        root = mypath.db_root_dir(args.dataset, root=args.data_root)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    if context.is_main and args.dataset == "demo":
        logger.info("demo dataset: %s", root)
    # Rank 0 first: it may generate the demo data or write index caches the others then read.
    with main_process_first(context):
        val_set = build_dataset(args.dataset, root, "val",
                                transform=tr.eval_transform(args.eval_size),
                                skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir)
        train_set = None if args.eval_only else build_dataset(
            args.dataset, root, "train", transform=tr.train_transform(args.base_size,
                                                                      args.crop_size),
            skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir)
    return train_set, val_set


def build_model(args: argparse.Namespace, checkpoint: dict | None, num_classes: int,
                context: DistributedContext) -> DeepLab:
    """The model ``--resume`` describes (weights loaded), or a new one from the flags (with
    ``--ft``, the checkpoint's weights where they fit)."""
    if checkpoint is not None and not args.ft:
        settings = checkpoint["settings"]
        if settings["num_classes"] != num_classes:
            raise UserError(f"--resume checkpoint has {settings['num_classes']} classes but "
                            f"--dataset {args.dataset} has {num_classes}: use --ft to fine-tune")
        model = DeepLab.from_settings(settings)
        model.load_state_dict(checkpoint["model"])
        return model
    try:
        # A fine-tuned model upsamples as the one it starts from (converted ones: corners).
        model = DeepLab(backbone=canonical_backbone_name(args.backbone),
                        output_stride=args.out_stride, num_classes=num_classes,
                        aux_loss=args.aux_loss,
                        pretrained_backbone=args.pretrained and not args.ft and not args.init,
                        backbone_weights=args.backbone_weights, align_corners=bool(
                            args.ft and checkpoint["settings"].get("align_corners", False)))
    except PretrainedWeightsUnavailable as error:
        raise UserError(f"{error}; pass --no-pretrained to train from scratch, or "
                        f"--backbone-weights PATH with a local torchvision ResNet state "
                        f"dict") from None
    except (FileNotFoundError, ValueError) as error:  # a missing, unsafe or foreign file
        if not args.backbone_weights:
            raise
        raise UserError(f"--backbone-weights: {error}") from None
    if args.init:
        init_from_coco_deeplabv3(model, args.init, context)
    if args.ft:
        try:
            reinit = model.load_finetune_state_dict(checkpoint["model"])
        except ValueError as error:
            raise UserError(f"--ft checkpoint does not match this model ({error}): use the same "
                            f"--backbone and --aux-loss") from None
        if reinit and context.is_main:
            print(f"fine-tuning: re-initialised {', '.join(reinit)} (class count "
                  f"{checkpoint['settings']['num_classes']} -> {num_classes})")
    return model


def init_from_coco_deeplabv3(model: DeepLab, init: str, context: DistributedContext) -> None:
    """``--init``: load torchvision's COCO DeepLabV3 (downloaded, or the file ``init``)."""
    path = None if init == INIT_TORCHVISION_COCO else init
    try:
        report = init_from_torchvision_deeplabv3(
            model, coco_deeplabv3_state_dict(model.backbone_name, path))
    except (PretrainedWeightsUnavailable, FileNotFoundError, ValueError) as error:
        hint = " (pass a downloaded file as --init PATH)" * isinstance(
            error, PretrainedWeightsUnavailable)
        raise UserError(f"--init {init}: {error}{hint}") from None
    if context.is_main:
        print(f"--init: {len(report.loaded)} tensors from torchvision's COCO DeepLabV3 "
              f"{model.backbone_name} (backbone, ASPP, aux head if any); the decoder starts fresh")


def plan_run(args: argparse.Namespace, train_size: int, hardware: Hardware,
             context: DistributedContext) -> TrainPlan:
    epochs = DEFAULT_EPOCHS[args.dataset] if args.epochs is None else args.epochs
    return plan_training(train_size=train_size, batch_size=args.batch_size,
                         devices=hardware.devices_per_process, world_size=context.world_size,
                         epochs=epochs, lr=args.lr,
                         print_freq=args.print_freq, save_interval=args.save_interval,
                         eval_interval=args.eval_interval)


def build_optimisation(args: argparse.Namespace, model: DeepLab, plan: TrainPlan, train_set,
                       hardware: Hardware, context: DistributedContext) -> Optimisation:
    """Loss, SGD, schedule and scaler from the flags (class weights: rank 0 first)."""
    weight = None
    if args.use_balanced_weights:
        with main_process_first(context):
            weight = compute_class_weights(train_set, model.num_classes,
                                           cache_dir=args.cache_dir).to(hardware.device)
    criterion = OutputsLoss(build_loss(args.loss_type, ignore_index=IGNORE_INDEX, weight=weight,
                                       gamma=args.focal_gamma), aux_weight=args.aux_weight)
    if not 0 <= args.warmup_iters < plan.total_iters:
        raise UserError(f"--warmup-iters {args.warmup_iters} must be at least 0 and below the "
                        f"run's {plan.total_iters} iterations ({plan.epochs} epochs x "
                        f"{plan.iters_per_epoch})")
    optimizer = build_optimizer(model, lr=plan.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov)
    scheduler = build_lr_scheduler(optimizer, args.lr_scheduler, total_iters=plan.total_iters,
                                   warmup_iters=args.warmup_iters,
                                   step_size=args.lr_step * plan.iters_per_epoch,
                                   gamma=args.lr_gamma)
    return Optimisation(criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                        scaler=grad_scaler(hardware.device, hardware.amp_dtype))


def run_settings(args: argparse.Namespace, *, plan: TrainPlan, settings: dict,
                 hardware: Hardware, context: DistributedContext, sync_bn: bool) -> dict:
    """What settings.json records: the flags, with the values that run where they were resolved
    (batch, learning rate, epochs, SyncBatchNorm) and the model's settings."""
    return dict(vars(args), batch_size=plan.batch_size, lr=plan.lr, epochs=plan.epochs,
                iters_per_epoch=plan.iters_per_epoch, total_iters=plan.total_iters,
                world_size=context.world_size, sync_bn=sync_bn,
                amp_dtype=str(hardware.amp_dtype), device=str(hardware.device), model=settings)


def report_finished(args: argparse.Namespace, state: TrainState, plan: TrainPlan,
                    context: DistributedContext) -> dict:
    """A resumed run with nothing left to do says so and writes nothing."""
    folder = os.path.dirname(os.path.abspath(args.resume))
    if context.is_main:
        print(f"{folder}: finished at iteration {state.iteration} of {plan.total_iters}, best "
              f"mIoU {100 * state.best_pred:.2f}; nothing to do (a larger --epochs trains on)")
    return {"iteration": state.iteration, "best_pred": state.best_pred, "metrics": None,
            "experiment_dir": folder, "lr": None, "finished": True}


def open_run_folder(args: argparse.Namespace, *, model: DeepLab, optimisation: Optimisation,
                    plan: TrainPlan, state: TrainState, settings: dict, run_settings: dict,
                    hardware: Hardware, context: DistributedContext) -> Checkpointer:
    """The checkpointer: on rank 0 it owns the run folder (locked, settings.json written, what
    the run will do printed) and the TensorBoard writer; elsewhere it saves nothing."""
    checkpointer = Checkpointer(saver=None, summary=None, model=model, optimisation=optimisation,
                                plan=plan, settings=settings)
    checkname = args.checkname or f"deeplab-{settings['backbone']}"
    experiment_dir = args.run_dir or (
        os.path.dirname(os.path.abspath(args.resume)) if args.resume and not args.ft else None)
    refused = None
    if context.is_main:
        try:
            checkpointer.saver = Saver(run_root=args.run_root, dataset=args.dataset,
                                       checkname=checkname, experiment_dir=experiment_dir)
        except UserError as error:  # the folder is another live run's
            refused = error
    # The other ranks stop with rank 0 instead of waiting for it in the first step.
    if any_true(refused is not None, context, hardware.device):
        raise refused or UserError("rank 0 could not open the run folder (its error says why)")
    if not context.is_main:
        return checkpointer
    saver = checkpointer.saver
    try:
        saver.save_settings(run_settings)
        # Events past the checkpoint (a killed run's, or those of a run killed before its first
        # checkpoint) are dropped by readers (purge_step), so each step appears once; events up
        # to the checkpoint were flushed before it was saved.
        checkpointer.summary = TensorboardSummary(saver.experiment_dir,
                                                  purge_step=state.iteration + 1)
    except BaseException:
        saver.close()
        raise
    print(f"run folder: {saver.experiment_dir}\n{plan.iters_per_epoch * plan.total_batch} train "
          f"images per epoch, {settings['num_classes']} classes; {plan}; {args.lr_scheduler}; "
          f"device {hardware.device} x{hardware.devices_per_process}, {context.world_size} "
          f"process(es), amp {hardware.amp_dtype}")
    return checkpointer


def build_loader(dataset, args: argparse.Namespace, *, batch_size: int, shuffle: bool,
                 context: DistributedContext, hardware: Hardware
                 ) -> tuple[Any, ResumableSampler]:
    """Training loaders shuffle and drop the last partial batch; val loaders score every image."""
    return resumable_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=args.seed,
                            rank=context.rank, world_size=context.world_size,
                            workers=args.workers, pin_memory=hardware.device.type == "cuda",
                            drop_last=shuffle)


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    """Train (or with ``--eval-only`` evaluate) as the flags say; returns a summary dict."""
    check_flags(args)
    args = auto_resume(args)
    check_run_folder(args)
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda,
                               timeout_minutes=args.dist_timeout)
    try:
        hardware = resolve_hardware(no_cuda=args.no_cuda, gpu_ids=args.gpu_ids, amp=args.amp,
                                    channels_last=args.channels_last, context=context)
        note = cpu_bf16_note(args.amp, hardware.device, measure_with="python -m bench.train_step")
        if note and context.is_main:
            print(note)
        torch.manual_seed(args.seed)
        checkpoint = read_checkpoint(args.resume)
        train_set, val_set = build_datasets(args, context)
        if args.check_data:  # read every sample before any model is built
            return check_data(train_set, val_set, workers=args.workers, context=context)
        model = build_model(args, checkpoint, len(val_set.class_names), context)
        settings = dict(model.settings(), **val_set.metadata())  # a self-describing checkpoint
        # Same initial weights on every rank (DDP also broadcasts them), different dropout masks.
        torch.manual_seed(args.seed + context.rank)
        model, plain_model, sync_bn = prepare_model(
            model, hardware, context=context, sync_bn=args.sync_bn, compile_model=args.compile)
        # Batch 1: full-resolution labels differ in size.
        val_loader, _ = build_loader(val_set, args, batch_size=1, shuffle=False,
                                     context=context, hardware=hardware)
        if args.eval_only:
            return evaluate_checkpoint(args, plain_model, val_loader, settings=settings,
                                       iteration=checkpoint.get("iteration", 0),
                                       hardware=hardware, context=context)

        plan = plan_run(args, len(train_set), hardware, context)
        train_loader, train_sampler = build_loader(train_set, args, batch_size=plan.batch_size,
                                                   shuffle=True, context=context,
                                                   hardware=hardware)
        optimisation = build_optimisation(args, plain_model, plan, train_set, hardware, context)
        recorded = run_settings(args, plan=plan, settings=settings, hardware=hardware,
                                context=context, sync_bn=sync_bn)
        check_requeued_settings(args, recorded)
        state = TrainState() if checkpoint is None or args.ft else restore_training_state(
            checkpoint, optimisation=optimisation, plan=plan, seed=args.seed, rank=context.rank)
        if checkpoint is not None and not args.ft and state.iteration >= plan.total_iters \
                and not state.eval_pending:
            return report_finished(args, state, plan, context)
        checkpointer = open_run_folder(args, model=plain_model, optimisation=optimisation,
                                       plan=plan, state=state, settings=settings,
                                       run_settings=recorded, hardware=hardware, context=context)
        metrics = None
        try:
            with StopFlag(extra_signals=(args.requeue_signal,)).installed() as stop:
                for epoch in range(state.epoch, plan.epochs):
                    state.epoch = epoch
                    if not state.eval_pending:  # else a resumed run owes this epoch's evaluation
                        # Continue the epoch where a checkpoint stopped it.
                        train_sampler.set_epoch(epoch, start=(
                            state.iteration % plan.iters_per_epoch) * plan.batch_size)
                        train_one_epoch(model, optimisation, train_loader, state=state, plan=plan,
                                        hardware=hardware, context=context,
                                        checkpointer=checkpointer, stop=stop)
                        broadcast_buffers(plain_model, context)  # rank 0's BatchNorm statistics
                        state.eval_pending = plan.evaluates_after(epoch)
                    is_best = False
                    if state.eval_pending:
                        metrics = evaluate_epoch(plain_model, val_loader, state=state,
                                                 checkpointer=checkpointer, hardware=hardware,
                                                 context=context, args=args, stop=stop)
                        state.eval_pending = False
                        is_best = metrics["mean_iou"] is not None and \
                            metrics["mean_iou"] > state.best_pred
                        state.best_pred = metrics["mean_iou"] if is_best else state.best_pred
                    checkpointer.save(state, is_best=is_best)
        finally:
            checkpointer.close()
        check_ranks_in_sync(plain_model, context)
        if context.is_main:
            print(f"done: best mIoU {100 * state.best_pred:.2f}; checkpoints in "
                  f"{checkpointer.saver.experiment_dir}")
        return {"iteration": state.iteration, "best_pred": state.best_pred, "metrics": metrics,
                "experiment_dir": checkpointer.saver and checkpointer.saver.experiment_dir,
                "lr": optimisation.lr}
    finally:
        cleanup(context)


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(model: nn.Module, optimisation: Optimisation, loader, *, state: TrainState,
                    plan: TrainPlan, hardware: Hardware, context: DistributedContext,
                    checkpointer: Checkpointer, stop: StopFlag) -> None:
    """Train the rest of epoch ``state.epoch``, from step ``state.iteration``; between steps,
    :class:`StepBoundary` logs, checks for NaN, saves when due and stops on a signal.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite (nothing is saved after it).
        Interrupted: a stop signal arrived; the state was saved first.
    """
    model.train()
    skipped = 0
    progress = tqdm(loader, desc=f"epoch {state.epoch}", disable=not context.is_main,
                    initial=state.iteration % plan.iters_per_epoch, total=plan.iters_per_epoch,
                    dynamic_ncols=True)
    log = TrainLog(checkpointer.summary, progress, context.world_size)
    boundary = StepBoundary(plan=plan, log=log, stop=stop, checkpointer=checkpointer,
                            context=context, device=hardware.device)
    # Under DDP with --skip-bad-images batches may shrink: the ranks agree on skipped steps.
    # (loader.dataset is the SeededDataset around the training set.)
    agree_on_skips = context.enabled and loader.dataset.dataset.skip_bad_images
    for batch in progress:
        skipped += int(batch["skipped"])
        inputs = step_batch(batch, hardware, context, agree_on_skips)
        if inputs is not None:
            loss = train_step(model, *inputs, optimisation, hardware)
            log.add(state.iteration + 1, loss, optimisation.lr, len(inputs[0]))
        step_schedule(optimisation.scheduler)
        state.iteration += 1
        boundary.after_step(state)
    if skipped and context.is_main:
        print(f"epoch {state.epoch}: skipped {skipped} bad samples (--skip-bad-images)")


class StepBoundary:
    """What happens between two training steps: the losses are logged (and checked for NaN)
    every ``plan.print_freq`` steps and before every save, the state is saved every
    ``plan.save_interval`` steps, and on a stop signal it is saved and :class:`Interrupted`
    raised. A stop at an epoch's end saves that epoch's evaluation as owed
    (``state.eval_pending``) when one is due, so the resumed run gives it.

    One process reads its stop flag at every boundary. Under DDP the ranks compare their stop
    and NaN flags at log points and interval saves (one collective), so that they stop, or fail,
    at the same step: a rank leaving alone would keep the others waiting in the next all-reduce.
    Rank 0 does not wait for that to save after its own signal: every rank holds the same
    weights after a step, and a launcher's SIGKILL follows its SIGTERM within seconds.
    """

    def __init__(self, *, plan: TrainPlan, log: TrainLog, stop: StopFlag,
                 checkpointer: Checkpointer, context: DistributedContext,
                 device: torch.device) -> None:
        self.plan, self.log, self.stop, self.checkpointer = plan, log, stop, checkpointer
        self.context, self.device = context, device
        self.saved_since_stop = False
        self.nonfinite: NonFiniteLoss | None = None  # seen here, not yet agreed on

    def after_step(self, state: TrainState) -> None:
        """Called after optimiser step ``state.iteration``.

        Raises:
            NonFiniteLoss: a loss since the last check was NaN or infinite (on any rank).
            Interrupted: a stop signal arrived (at any rank); the state was saved first.
        """
        plan, context, stop = self.plan, self.context, self.stop
        at_epoch_end = state.iteration % plan.iters_per_epoch == 0
        at_log_point = state.iteration % plan.print_freq == 0 or at_epoch_end
        save_due = bool(plan.save_interval) and state.iteration % plan.save_interval == 0 \
            and not at_epoch_end  # epoch ends are saved by main, after the evaluation
        save_on_signal = stop.is_set and context.is_main and not self.saved_since_stop
        if not (at_log_point or save_due or save_on_signal):
            return
        try:
            self.log.flush(state.iteration)
        except NonFiniteLoss as error:
            self.nonfinite = self.nonfinite or error
        agreed = not context.enabled or at_log_point or save_due
        stopping = stop.is_set and agreed
        if agreed and context.enabled:
            nonfinite, stopping = any_true_each((self.nonfinite is not None, stop.is_set),
                                                context, self.device)
            if nonfinite and self.nonfinite is None:
                self.nonfinite = NonFiniteLoss(f"loss is not finite on another rank, by "
                                               f"iteration {state.iteration}")
        if agreed and self.nonfinite is not None:
            raise self.nonfinite
        state.eval_pending = at_epoch_end and plan.evaluates_after(state.epoch)
        if save_due or ((stop.is_set or stopping) and not self.saved_since_stop):
            # Unagreed, rank 0 cannot know of another rank's NaN but by the shared weights.
            if agreed or (self.nonfinite is None and _finite(self.checkpointer.model)):
                self.checkpointer.save(state)
                self.saved_since_stop = stop.is_set or stopping
        if stopping:
            raise stop.interrupted()


def _finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               optimisation: Optimisation, hardware: Hardware) -> torch.Tensor:
    """One forward/backward/update; returns the (device) loss.

    In fp16 the GradScaler skips the update when a gradient is inf or NaN (the weights and the
    momentum stay as they were) and halves its scale. The caller steps the learning-rate
    schedule after every call all the same, as torchvision's reference does (Lightning skips
    it): the schedule is a function of the iteration, which a resumed run restores, not of how
    many updates the scaler let through. A non-finite *loss* is the caller's to report
    (:class:`utils.summaries.TrainLog`); a skipped step with a finite loss is not a divergence.
    No gradient is clipped here; clipping would need ``scaler.unscale_`` first.
    """
    with hardware.autocast():
        loss = optimisation.criterion(model(images), targets)
    optimisation.optimizer.zero_grad(set_to_none=True)
    scaler = optimisation.scaler
    with backward_kernels(hardware):
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimisation.optimizer)
            scaler.update()
        else:
            loss.backward()
            optimisation.optimizer.step()
    return loss


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance the learning-rate schedule by one iteration, whether or not the step before
    updated the weights (a GradScaler skip, a skipped bad batch): see :func:`train_step`.

    PyTorch warns when the first ``scheduler.step()`` comes before any ``optimizer.step()``,
    which in fp16 is the rule rather than a mistake (the first steps of a new model overflow
    until the scale comes down): that warning is silenced, here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                r"before `optimizer\.step\(\)`")
        scheduler.step()


def step_batch(batch: dict[str, Any], hardware: Hardware, context: DistributedContext,
               agree: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of a loaded batch one step trains on (on the device), or None to skip the step.

    BatchNorm in ASPP's image pooling needs 2 images per device: a batch that
    ``--skip-bad-images`` shrank is cut to the largest size DataParallel splits into chunks of
    at least 2, or skipped. With ``agree`` (DDP with skipping), the ranks skip together: a rank
    that sat out would leave the others waiting in SyncBatchNorm and the gradient all-reduce.
    """
    size = len(batch["image"]) if "image" in batch else 0
    usable = usable_batch_size(size, hardware.devices_per_process)
    if agree and any_true(usable == 0, context, hardware.device):
        return None
    if usable == 0:
        return None
    return hardware.inputs({"image": batch["image"][:usable], "label": batch["label"][:usable]})


# --------------------------------------------------------------------------- evaluation


#: Under DDP the ranks compare stop flags every this many evaluation batches (a collective).
EVAL_STOP_CHECK_INTERVAL = 10


def _stop_requested(stop: StopFlag | None, index: int, common_batches: int,
                    context: DistributedContext, device: torch.device) -> bool:
    """Whether evaluation should stop before batch ``index``. One process reads its flag; DDP
    ranks agree every :data:`EVAL_STOP_CHECK_INTERVAL` batches, while every rank still has
    batches (``common_batches``), so that all of them take part in the collective."""
    if stop is None:
        return False
    if not context.enabled:
        return stop.is_set
    if index % EVAL_STOP_CHECK_INTERVAL or index >= common_batches:
        return False
    return any_true(stop.is_set, context, device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, num_classes: int, hardware: Hardware,
             context: DistributedContext, scales: list[float], flip: bool,
             stop: StopFlag | None = None,
             worst: WorstImages | None = None) -> tuple[Evaluator, dict | None]:
    """Score full-resolution predictions on every val image (summed over ranks).

    A stop signal (``stop``) ends evaluation within a few batches: a full COCO val takes
    minutes, longer than a pre-emption grace period. ``worst``, if given, scores each image too
    and ends holding the worst of all ranks (batches must carry ``"index"``, as the
    :func:`dataloader.samplers.resumable_loader` ones do).

    Returns:
        The evaluator and, for the TensorBoard grid, the first batch's tensors.

    Raises:
        Interrupted: ``stop`` was set during evaluation.
    """
    model.eval()
    evaluator = Evaluator(num_classes, device=hardware.device)
    first = None
    common_batches = len(loader.dataset) // context.world_size // (loader.batch_size or 1)
    progress = tqdm(loader, desc="val", disable=not context.is_main, dynamic_ncols=True)
    with cudnn_benchmark(False):  # every full-resolution image has its own size
        for index, batch in enumerate(progress):
            if _stop_requested(stop, index, common_batches, context, hardware.device):
                raise stop.interrupted()
            if "image" not in batch:
                continue
            image, target = hardware.inputs(batch)
            # The prediction inference.py writes for the same image (one shared function).
            with hardware.autocast():
                prediction = predict_labels(model, image, tuple(target.shape[-2:]), scales, flip)
            evaluator.add_batch(target, prediction)
            if worst is not None:
                worst.add(batch["index"].tolist(), image, target, prediction)
            if first is None:
                first = {"image": F.interpolate(image.float(), size=tuple(target.shape[-2:]),
                                                mode="bilinear", align_corners=False).cpu(),
                         "target": target.cpu(), "prediction": prediction.cpu()}
    evaluator.all_reduce()
    if worst is not None:
        worst.all_gather()
    return evaluator, first


def worst_images_tracker(k: int, settings: dict, loader) -> WorstImages | None:
    """A :class:`WorstImages` for one evaluation pass over ``loader`` (None when ``k`` is 0),
    naming images by the val dataset's ``sample_name``."""
    if k <= 0:
        return None
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # inside SeededDataset
    return WorstImages(k, len(settings["class_names"]), mean=settings["mean"],
                       std=settings["std"], name_of=dataset.sample_name)


def draw_evaluation(results: dict, worst: WorstImages | None, settings: dict) -> dict:
    """The evaluation figures of :func:`utils.figures.evaluation_figures` ({} without
    matplotlib)."""
    return evaluation_figures(confusion_matrix=results["confusion_matrix"],
                              class_names=settings["class_names"], palette=settings["palette"],
                              worst=worst.worst() if worst is not None else ())


def evaluate_epoch(model: nn.Module, val_loader, *, state: TrainState, checkpointer: Checkpointer,
                   hardware: Hardware, context: DistributedContext, args: argparse.Namespace,
                   stop: StopFlag) -> dict:
    """Evaluate after an epoch: print the per-class table, write TensorBoard, metrics.json and
    the evaluation figures (rank 0); returns the metrics. Interrupted, it saves the epoch's
    training first, with its evaluation still owed (``state.eval_pending``), so ``--resume``
    evaluates it."""
    settings = checkpointer.settings
    class_names = settings["class_names"]
    worst = worst_images_tracker(args.eval_worst, settings, val_loader)
    try:
        evaluator, first = evaluate(model, val_loader, num_classes=len(class_names),
                                    hardware=hardware, context=context,
                                    scales=args.eval_scales, flip=args.eval_flip, stop=stop,
                                    worst=worst)
    except Interrupted:
        checkpointer.save(state)
        raise
    results = evaluator.results(class_names)
    summary, saver = checkpointer.summary, checkpointer.saver
    if saver is not None and summary is not None:
        print(f"epoch {state.epoch} (iteration {state.iteration}):")
        print(evaluator.format_table(class_names))
        summary.log_metrics(results, state.iteration, class_names)
        if first is not None:
            summary.visualize(first["image"], first["target"], first["prediction"],
                              palette=settings["palette"], mean=settings["mean"],
                              std=settings["std"], step=state.iteration)
        atomic_write_text(os.path.join(saver.experiment_dir, "metrics.json"),
                          metrics_json(dict(results, epoch=state.epoch, iteration=state.iteration)))
        figures = draw_evaluation(results, worst, settings)
        summary.add_figures(figures, state.iteration)
        save_figures(figures, saver.experiment_dir)
    return results


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, val_loader, *,
                        settings: dict, iteration: int, hardware: Hardware,
                        context: DistributedContext) -> dict:
    """``--eval-only``: score the ``--resume`` checkpoint's model and write its metrics to
    ``--eval-json`` (default: eval_metrics.json beside the checkpoint).

    The evaluation figures go beside it as ``<json stem>_<figure>.png`` and into TensorBoard at
    step ``iteration`` (the checkpoint's), in the folder ``<json stem>/`` beside it: a
    TensorBoard run of its own, apart from the training run's curves.
    """
    class_names = settings["class_names"]
    worst = worst_images_tracker(args.eval_worst, settings, val_loader)
    evaluator, _ = evaluate(model, val_loader, num_classes=len(class_names), hardware=hardware,
                            context=context, scales=args.eval_scales, flip=args.eval_flip,
                            worst=worst)
    results = evaluator.results(class_names)
    if context.is_main:
        print(evaluator.format_table(class_names))
        json_path = args.eval_json or os.path.join(
            os.path.dirname(os.path.abspath(args.resume)), "eval_metrics.json")
        atomic_write_text(json_path, metrics_json(results))
        print(f"metrics written to {json_path}")
        figures = draw_evaluation(results, worst, settings)
        if figures:
            stem = os.path.splitext(json_path)[0]
            save_figures(figures, os.path.dirname(stem), prefix=os.path.basename(stem) + "_")
            summary = TensorboardSummary(stem)
            summary.add_figures(figures, iteration)
            summary.close()
    return {"metrics": results}


def check_data(train_set, val_set, *, workers: int, context: DistributedContext) -> dict:
    """``--check-data``: rank 0 reads every sample and reports (its exit status is torchrun's)."""
    if not context.is_main:
        return {"data_ok": True}
    report = check_datasets({"train": train_set, "val": val_set}, workers=workers)
    print(report.format())
    return {"data_ok": report.ok, "data_report": report}


def check_ranks_in_sync(model: nn.Module, context: DistributedContext) -> None:
    """After training under DDP every rank must hold the same weights; say so, or fail."""
    if not context.enabled:
        return
    same = ranks_in_sync(model, context)
    if context.is_main:
        print(f"weights identical across {context.world_size} ranks: {'yes' if same else 'NO'}")
    if not same:
        raise RuntimeError("model weights differ across ranks after training")


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        result = main(args)
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
        if error.signum == args.requeue_signal and launch_context(os.environ)[0].is_main:
            requeue_job(os.environ)  # under SLURM; --auto-resume continues the requeued job
        return 128 + error.signum
    except torch.cuda.OutOfMemoryError:
        print("error: GPU out of memory: lower --batch-size or --crop-size, or use --amp bf16/"
              "fp16, --out-stride 16 or a smaller --backbone", file=sys.stderr)
        return 4
    return 0 if result.get("data_ok", True) else 1


if __name__ == "__main__":
    sys.exit(cli())
