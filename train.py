#!/usr/bin/env python
"""Train and evaluate DeepLabV3+ (https://arxiv.org/abs/1802.02611).

    python train.py --backbone resnet --out-stride 16                   # one GPU, several, or CPU
    torchrun --nproc_per_node 8 train.py --backbone resnet              # DDP on one machine
    python train.py --eval-only --resume run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar

Only the scripts read command-line flags. ``main`` lists the steps of a run; the loop lives in
utils/engine.py, device and precision in utils/hardware.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch
from torch import nn

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
from modeling.pretrained import (coco_deeplabv3_state_dict, coco_deeplabv3_weights,
                                 init_from_torchvision_deeplabv3)
from utils.distributed import (DEFAULT_TIMEOUT_MINUTES, DistributedContext, cleanup,
                               init_distributed, main_process_first)
from utils.engine import (DEFAULT_BATCH_PER_DEVICE, REFERENCE_BATCH, REFERENCE_LR, Checkpointer,
                          Interrupted, LoopSettings, NonFiniteLoss, Optimisation, Schedule,
                          TrainState, evaluate_checkpoint, fit, make_optimisation, make_schedule,
                          restore_training_state)
from utils.errors import UserError
from utils.hardware import Hardware, add_hardware_args, prepare_model, resolve_hardware
from utils.losses import LOSSES
from utils.lr_scheduler import SCHEDULERS
from utils.saver import CHECKPOINT_NAME, CheckpointError, Saver, load_checkpoint
from utils.summaries import TensorboardSummary

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


def plan_schedule(args: argparse.Namespace, train_size: int, hardware: Hardware,
                  context: DistributedContext) -> Schedule:
    return make_schedule(train_size=train_size, batch_size=args.batch_size,
                         devices=hardware.devices_per_process, world_size=context.world_size,
                         epochs=args.epochs or DEFAULT_EPOCHS[args.dataset], lr=args.lr)


def build_optimisation(args: argparse.Namespace, model: DeepLab, schedule: Schedule, train_set,
                       hardware: Hardware, context: DistributedContext) -> Optimisation:
    """Loss, SGD, schedule and scaler from the flags (class weights: rank 0 first)."""
    weight = None
    if args.use_balanced_weights:
        with main_process_first(context):
            weight = compute_class_weights(train_set, model.num_classes, cache_dir=args.cache_dir)
    return make_optimisation(
        model, lr=schedule.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, scheduler=args.lr_scheduler, total_iters=schedule.total_iters,
        warmup_iters=args.warmup_iters, step_size=args.lr_step * schedule.iters_per_epoch,
        gamma=args.lr_gamma, loss=args.loss_type, class_weight=weight,
        focal_gamma=args.focal_gamma, aux_weight=args.aux_weight, ignore_index=IGNORE_INDEX,
        hardware=hardware)


def open_run_folder(args: argparse.Namespace, *, settings: dict, schedule: Schedule,
                    state: TrainState, hardware: Hardware, context: DistributedContext,
                    sync_bn: bool, train_size: int) -> tuple[Saver | None,
                                                             TensorboardSummary | None]:
    """Rank 0's Saver and TensorBoard writer (None elsewhere); writes settings.json and says
    what the run will do."""
    if not context.is_main:
        return None, None
    checkname = args.checkname or f"deeplab-{settings['backbone']}"
    experiment_dir = args.run_dir or (
        os.path.dirname(os.path.abspath(args.resume)) if args.resume and not args.ft else None)
    saver = Saver(run_root=args.run_root, dataset=args.dataset, checkname=checkname,
                  experiment_dir=experiment_dir)
    saver.save_settings(dict(
        vars(args), batch_size=schedule.batch_size, lr=schedule.lr, epochs=schedule.epochs,
        iters_per_epoch=schedule.iters_per_epoch, total_iters=schedule.total_iters,
        world_size=context.world_size, sync_bn=sync_bn, amp_dtype=str(hardware.amp_dtype),
        device=str(hardware.device), model=settings))
    # Events of a killed run past its checkpoint are dropped by readers (purge_step), so each
    # step appears once; events up to the checkpoint were flushed before it was saved.
    summary = TensorboardSummary(saver.experiment_dir,
                                 purge_step=state.iteration + 1 if state.iteration else None)
    print(f"run folder: {saver.experiment_dir}\n{train_size} train images, "
          f"{settings['num_classes']} classes; {schedule}; {args.lr_scheduler}; device "
          f"{hardware.device} x{hardware.devices_per_process}, {context.world_size} process(es), "
          f"amp {hardware.amp_dtype}")
    return saver, summary


def loader(dataset, *, batch_size: int, shuffle: bool, args: argparse.Namespace,
           context: DistributedContext, hardware: Hardware) -> tuple[Any, ResumableSampler]:
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
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda,
                               timeout_minutes=args.dist_timeout)
    try:
        hardware = resolve_hardware(no_cuda=args.no_cuda, gpu_ids=args.gpu_ids, amp=args.amp,
                                    channels_last=args.channels_last, context=context)
        torch.manual_seed(args.seed)
        checkpoint = read_checkpoint(args.resume)
        train_set, val_set = build_datasets(args, context)
        if args.check_data:  # read every sample before any model is built
            if not context.is_main:  # once is enough: rank 0 reads and reports, and its exit
                return {"data_ok": True}  # status is torchrun's
            report = check_datasets({"train": train_set, "val": val_set}, workers=args.workers)
            print(report.format())
            return {"data_ok": report.ok, "data_report": report}
        model = build_model(args, checkpoint, len(val_set.class_names), context)
        settings = dict(model.settings(), **val_set.metadata())  # a self-describing checkpoint
        # Same initial weights on every rank (DDP also broadcasts them), different dropout masks.
        torch.manual_seed(args.seed + context.rank)
        model, plain_model, sync_bn = prepare_model(
            model, hardware, context=context, sync_bn=args.sync_bn, compile_model=args.compile)
        # Batch 1: full-resolution labels differ in size.
        val_loader, _ = loader(val_set, batch_size=1, shuffle=False, args=args,
                               context=context, hardware=hardware)
        if args.eval_only:
            return evaluate_checkpoint(
                model=plain_model, loader=val_loader, settings=settings, hardware=hardware,
                scales=args.eval_scales, flip=args.eval_flip, context=context,
                json_path=args.eval_json or os.path.join(
                    os.path.dirname(os.path.abspath(args.resume)), "eval_metrics.json"),
                worst_images=args.eval_worst, iteration=checkpoint.get("iteration", 0))
        return train(args, model=model, plain_model=plain_model, settings=settings,
                     train_set=train_set, val_loader=val_loader, checkpoint=checkpoint,
                     hardware=hardware, context=context, sync_bn=sync_bn)
    finally:
        cleanup(context)


def train(args: argparse.Namespace, *, model: nn.Module, plain_model: DeepLab, settings: dict,
          train_set, val_loader, checkpoint: dict | None, hardware: Hardware,
          context: DistributedContext, sync_bn: bool) -> dict:
    """Plan the schedule, build the optimisation, restore, open the run folder and fit."""
    schedule = plan_schedule(args, len(train_set), hardware, context)
    train_loader, train_sampler = loader(train_set, batch_size=schedule.batch_size, shuffle=True,
                                         args=args, context=context, hardware=hardware)
    optimisation = build_optimisation(args, plain_model, schedule, train_set, hardware, context)
    state = TrainState() if checkpoint is None or args.ft else restore_training_state(
        checkpoint, optimisation=optimisation, iters_per_epoch=schedule.iters_per_epoch,
        seed=args.seed, rank=context.rank)
    saver, summary = open_run_folder(args, settings=settings, schedule=schedule, state=state,
                                     hardware=hardware, context=context, sync_bn=sync_bn,
                                     train_size=len(train_set))
    loop = LoopSettings(
        total_iters=schedule.total_iters, iters_per_epoch=schedule.iters_per_epoch,
        batch_size=schedule.batch_size, print_freq=args.print_freq,
        save_interval=args.save_interval, eval_interval=args.eval_interval,
        eval_scales=tuple(args.eval_scales), eval_flip=args.eval_flip,
        eval_worst=args.eval_worst, skip_bad_images=args.skip_bad_images)
    checkpointer = Checkpointer(saver=saver, summary=summary, model=plain_model,
                                optimisation=optimisation,
                                iters_per_epoch=schedule.iters_per_epoch, settings=settings)
    try:
        results = fit(model=model, plain_model=plain_model, optimisation=optimisation,
                      train_loader=train_loader, train_sampler=train_sampler,
                      val_loader=val_loader, state=state, checkpointer=checkpointer, loop=loop,
                      hardware=hardware, context=context)
    finally:
        if summary is not None:
            summary.close()
    if saver is not None:
        print(f"done: best mIoU {100 * state.best_pred:.2f}; checkpoints in "
              f"{saver.experiment_dir}")
    return {"iteration": state.iteration, "best_pred": state.best_pred, "metrics": results,
            "experiment_dir": saver.experiment_dir if saver else None,
            "lr": optimisation.optimizer.param_groups[0]["lr"]}


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
        return 128 + error.signum
    except torch.cuda.OutOfMemoryError:
        print("error: GPU out of memory: lower --batch-size or --crop-size, or use --amp bf16/"
              "fp16, --out-stride 16 or a smaller --backbone", file=sys.stderr)
        return 4
    return 0 if result.get("data_ok", True) else 1


if __name__ == "__main__":
    sys.exit(cli())
