#!/usr/bin/env python
"""Train and evaluate DeepLabV3+ (https://arxiv.org/abs/1802.02611).

    python train.py --backbone resnet --out-stride 16                   # one GPU, several, or CPU
    torchrun --nproc_per_node 8 train.py --backbone resnet              # DDP on one machine
    python train.py --eval-only --resume run/coco/deeplab-resnet101/experiment_0/model_best.pth.tar

``main`` shows a run: the builders, then each epoch trains, evaluates when due, saves, reports.
Training support is in utils/: run_folder, stopping (signals, NaN), evaluation_report, ...
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import mypath
from dataloader.check import check_data
from dataloader.class_weights import compute_class_weights
from dataloader.datasets import DATASETS, add_data_args, build_dataset, dataset_entry
from dataloader.statistics import set_inputs
from dataloader.samplers import ResumableSampler, resumable_loader
from dataloader.utils import IGNORE_INDEX, DatasetError
from modeling.backbone import (BACKBONE_ALIASES, BACKBONES, PretrainedWeightsUnavailable,
                               canonical_backbone_name)
from modeling.checkpoint import load_model
from modeling.deeplab import DeepLab
from modeling.inference_ops import predict_labels
from modeling.pretrained import (INIT_TORCHVISION_COCO, coco_deeplabv3_state_dict,
                                 coco_deeplabv3_weights, init_from_torchvision_deeplabv3)
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.distributed import (DistributedContext, broadcast_buffers,
                               check_ranks_in_sync, cleanup, init_distributed, launch_context,
                               main_process_first)
from utils.errors import UserError
from utils.evaluation_report import (Evaluation, EvaluationOptions,
                                     add_evaluation_args, eval_json_path, grid_batch,
                                     report_checkpoint, report_epoch, worst_images_tracker)
from utils.hardware import (Hardware, Placement, add_training_hardware_args, backward_kernels,
                            cudnn_benchmark, prepare_model, resolve_placement, step_batch)
from utils.losses import NonFiniteLoss, OutputsLoss, build_loss
from utils.lr_scheduler import build_lr_scheduler, step_schedule
from utils.metrics import Evaluator
from utils.optim import (Optimisation, add_optimisation_args, build_optimizer,
                         check_optimisation_flags, grad_scaler)
from utils.plan import TrainPlan, resolve_plan
from utils.run_folder import (Checkpointer, RunFolderOptions, TrainProgress, add_run_folder_args,
                              locate_run, open_run)
from utils.signals import Interrupted, StopFlag
from utils.slurm import requeue_job
from utils.stopping import StepBoundary, eval_stop_requested
from utils.summaries import TrainLog

logger = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train DeepLabV3+ for semantic segmentation",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(parser)
    add_data_args(parser)
    add_optimisation_args(parser, default_epochs="by dataset, " + ", ".join(
        f"{name} {entry.epochs}" for name, entry in sorted(DATASETS.items())))
    add_training_hardware_args(parser)
    add_run_folder_args(parser)
    add_evaluation_args(parser)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet101", choices=sorted(BACKBONES) + sorted(
        BACKBONE_ALIASES), help="a torchvision ResNet, or mobilenetv3 (MobileNetV3-Large); "
        "'resnet' means resnet101")
    model.add_argument("--out-stride", type=int, default=16, choices=(8, 16),
                       help="output stride of the backbone (16: faster, 8: finer)")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start the backbone from ImageNet weights (downloaded by torchvision)")
    model.add_argument("--backbone-weights", metavar="PATH",
                       help="local torchvision state dict of the backbone (a ResNet or "
                       "mobilenet_v3_large) to use instead of downloading")
    model.add_argument("--init", metavar=f"{INIT_TORCHVISION_COCO}|PATH", help="start backbone, "
                       "ASPP, aux head from torchvision's COCO DeepLabV3 (resnet50/101; download "
                       "or state dict file)")
    model.add_argument("--aux-loss", action=argparse.BooleanOptionalAction, default=False,
                       help="add an FCN auxiliary head on the stride-16 backbone stage")
    model.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary loss")


def check_flags(args: argparse.Namespace) -> EvaluationOptions:
    """Flag combinations that cannot work, refused before anything is built (the run folder's
    and evaluation's: by :class:`RunFolderOptions` and the evaluation options it returns)."""
    run_folder_options(args)
    check_optimisation_flags(vars(args))
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
    return EvaluationOptions.from_flags(vars(args))


def read_checkpoint(path: str | None) -> dict | None:
    """The ``--resume`` checkpoint (loaded safely, on the CPU), or None."""
    if not path:
        return None
    try:
        return load_checkpoint(path, map_location="cpu", required_keys=("model", "settings"))
    except CheckpointError as error:
        raise UserError(f"--resume: {error}") from None


def build_datasets(args: argparse.Namespace, context: DistributedContext,
                   checkpoint: dict | None) -> tuple[Any, Any]:
    """``(train set or None with --eval-only, val set)``, normalised by :func:`set_inputs`."""
    try:
        root = mypath.db_root_dir(args.dataset, root=args.data_root)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    if context.is_main and dataset_entry(args.dataset).generated:
        logger.info("%s dataset: %s", args.dataset, root)
    reading = dict(skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir,
                   mask_format=args.mask_format, reduce_zero_label=args.reduce_zero_label)
    # Rank 0 first: it may generate the demo data or write index and statistics caches.
    with main_process_first(context):
        val_set = build_dataset(args.dataset, root, "val", **reading)
        train_set = None if args.eval_only else build_dataset(args.dataset, root, "train",
                                                              **reading)
        set_inputs(train_set, val_set, sizes=(args.base_size, args.crop_size, args.eval_size),
                   mean=args.mean, std=args.std, cache_dir=args.cache_dir,
                   stored=checkpoint["settings"] if checkpoint and not args.ft else None)
    return train_set, val_set


def build_model(args: argparse.Namespace, checkpoint: dict | None, num_classes: int,
                context: DistributedContext, in_channels: int = 3) -> DeepLab:
    """The model ``--resume`` describes (weights loaded), or a new one from the flags (with
    ``--ft``, the checkpoint's weights where they fit) for images of ``in_channels`` bands."""
    loaded = None if checkpoint is None else load_model(checkpoint,
                                                        source=f"--resume {args.resume}")
    if loaded is not None and not args.ft:
        model, settings = loaded
        if settings["num_classes"] != num_classes:
            raise UserError(f"--resume checkpoint has {settings['num_classes']} classes but "
                            f"--dataset {args.dataset} has {num_classes}: use --ft to fine-tune")
        return model.train()  # in training mode, as a new model
    pretrained, pretrained_settings = loaded or (None, {})
    try:
        # A fine-tuned model upsamples as the one it starts from (converted ones: corners).
        model = DeepLab(backbone=canonical_backbone_name(args.backbone),
                        output_stride=args.out_stride, num_classes=num_classes,
                        aux_loss=args.aux_loss, in_channels=in_channels,
                        pretrained_backbone=args.pretrained and not args.ft and not args.init,
                        backbone_weights=args.backbone_weights, align_corners=bool(
                            args.ft and pretrained_settings.get("align_corners", False)))
    except PretrainedWeightsUnavailable as error:
        raise UserError(f"{error}; pass --no-pretrained to train from scratch, or "
                        f"--backbone-weights PATH with a local torchvision state dict of the "
                        f"backbone") from None
    except (FileNotFoundError, ValueError) as error:  # a missing, unsafe or foreign file
        if not args.backbone_weights:
            raise
        raise UserError(f"--backbone-weights: {error}") from None
    if args.init:
        init_from_coco_deeplabv3(model, args.init, context)
    if args.ft:
        try:
            reinit = model.load_finetune_state_dict(pretrained.state_dict())
        except ValueError as error:
            raise UserError(f"--ft checkpoint does not match this model ({error}): use the same "
                            f"--backbone and --aux-loss") from None
        if reinit and context.is_main:
            print(f"fine-tuning: re-initialised {', '.join(reinit)} (class count "
                  f"{pretrained_settings['num_classes']} -> {num_classes})")
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


def build_plan(args: argparse.Namespace, train_size: int, placement: Placement) -> TrainPlan:
    epochs = dataset_entry(args.dataset).epochs if args.epochs is None else args.epochs
    return resolve_plan(train_size=train_size, batch_size=args.batch_size, epochs=epochs,
                        lr=args.lr, placement=placement, print_freq=args.print_freq,
                        save_interval=args.save_interval, eval_interval=args.eval_interval)


def build_optimisation(args: argparse.Namespace, model: DeepLab, plan: TrainPlan, train_set,
                       placement: Placement) -> Optimisation:
    """Loss, SGD, schedule and scaler from the flags (class weights: rank 0 first)."""
    weight, hardware = None, placement.hardware
    if args.use_balanced_weights:
        with main_process_first(placement.context):
            weight = compute_class_weights(train_set, model.num_classes,
                                           cache_dir=args.cache_dir).to(hardware.device)
    criterion = OutputsLoss(build_loss(args.loss_type, ignore_index=IGNORE_INDEX, weight=weight,
                                       gamma=args.focal_gamma, top_k=args.ohem_top_k),
                            aux_weight=args.aux_weight)
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


def build_loader(dataset, args: argparse.Namespace, *, batch_size: int, shuffle: bool = False,
                 placement: Placement) -> tuple[Any, ResumableSampler]:
    """Training loaders shuffle and drop the last partial batch; val loaders score every image
    (in batches of 1: full-resolution labels differ in size)."""
    return resumable_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=args.seed,
                            rank=placement.context.rank, world_size=placement.context.world_size,
                            workers=args.workers,
                            pin_memory=placement.hardware.device.type == "cuda")


def main(args: argparse.Namespace) -> dict:
    """Train (or with ``--eval-only`` evaluate) as the flags say; returns a summary dict."""
    evaluation = check_flags(args)
    args = with_located_run(args)
    context = init_distributed(use_cuda=torch.cuda.is_available() and not args.no_cuda,
                               timeout_minutes=args.dist_timeout)
    try:
        placement = resolve_placement(no_cuda=args.no_cuda, gpu_ids=args.gpu_ids, amp=args.amp,
                                      channels_last=args.channels_last, context=context)
        torch.manual_seed(args.seed)
        checkpoint = read_checkpoint(args.resume)
        train_set, val_set = build_datasets(args, context, checkpoint)
        if args.check_data:  # read every sample before any model is built
            return check_data(train_set, val_set, workers=args.workers, context=context)
        model = build_model(args, checkpoint, val_set.num_classes, context, val_set.in_channels)
        settings = dict(model.settings(), **val_set.metadata())  # a self-describing checkpoint
        torch.manual_seed(args.seed + context.rank)  # weights built alike, dropout per rank
        model, plain_model, sync_bn = prepare_model(model, placement.hardware, sync_bn=args.sync_bn,
                                                    context=context, compile_model=args.compile)
        val_loader, _ = build_loader(val_set, args, batch_size=1, placement=placement)
        if args.eval_only:
            scored = evaluate(plain_model, val_loader, settings=settings, placement=placement,
                              options=evaluation)
            return report_checkpoint(scored, settings=settings, context=context,
                                     iteration=checkpoint.get("iteration", 0),
                                     json_path=eval_json_path(args.resume, args.eval_json))
        plan = build_plan(args, len(train_set), placement)
        train_loader, train_sampler = build_loader(train_set, args, batch_size=plan.batch_size,
                                                   shuffle=True, placement=placement)
        optimisation = build_optimisation(args, plain_model, plan, train_set, placement)
        checkpointer = Checkpointer(plain_model, optimisation, plan, settings)
        run = open_run(run_folder_options(args), checkpointer, checkpoint=checkpoint,
                       placement=placement, sync_bn=sync_bn)
        if run.finished:
            return run.finished
        progress, checkpointer, metrics = run.progress, run.checkpointer, None
        try:
            with StopFlag(extra_signals=(args.requeue_signal,)).installed() as stop:
                for epoch in range(progress.epoch, plan.epochs):
                    progress.epoch = epoch
                    if not progress.eval_pending:  # else a resumed run owes this epoch's evaluation
                        train_sampler.set_epoch(epoch, start=(  # where a checkpoint stopped it
                            progress.iteration % plan.iters_per_epoch) * plan.batch_size)
                        train_one_epoch(model, optimisation, train_loader, progress=progress,
                                        plan=plan, placement=placement,
                                        checkpointer=checkpointer, stop=stop)
                        broadcast_buffers(plain_model, context)  # rank 0's BatchNorm statistics
                        progress.eval_pending = plan.evaluates_after(epoch)
                    if progress.eval_pending:  # evaluate, save, then report
                        metrics = evaluate_epoch(plain_model, val_loader, evaluation,
                                                 progress=progress, checkpointer=checkpointer,
                                                 placement=placement, stop=stop)
                    else:
                        checkpointer.save(progress)
        finally:
            checkpointer.close()
        check_ranks_in_sync(plain_model, context)
        return run.done(metrics=metrics, lr=optimisation.lr, context=context)
    finally:
        cleanup(context)


def run_folder_options(args: argparse.Namespace) -> RunFolderOptions:
    return RunFolderOptions.from_flags(vars(args), backbone=canonical_backbone_name(args.backbone))


def with_located_run(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with ``--auto-resume`` resolved to ``--resume`` / ``--run-dir``, after refusing
    a folder this run would overwrite (:func:`utils.run_folder.locate_run`)."""
    found = locate_run(run_folder_options(args))
    return argparse.Namespace(**dict(vars(args), resume=found.resume, ft=found.ft,
                                     run_dir=found.run_dir))


def train_one_epoch(model: nn.Module, optimisation: Optimisation, loader, *,
                    progress: TrainProgress, plan: TrainPlan, placement: Placement,
                    checkpointer: Checkpointer, stop: StopFlag) -> None:
    """Train the rest of epoch ``progress.epoch`` from step ``progress.iteration``; between
    steps :class:`utils.stopping.StepBoundary` logs, checks for NaN (NonFiniteLoss), saves when
    due and stops on a signal (saved, then Interrupted)."""
    model.train()
    skipped, context = 0, placement.context
    progress_bar = tqdm(loader, desc=f"epoch {progress.epoch}", disable=not context.is_main,
                        initial=progress.iteration % plan.iters_per_epoch,
                        total=plan.iters_per_epoch, dynamic_ncols=True)
    log = TrainLog(checkpointer.summary, progress_bar, context.world_size)
    boundary = StepBoundary(plan=plan, log=log, stop=stop, checkpointer=checkpointer,
                            placement=placement)
    # Under DDP with --skip-bad-images batches may shrink: the ranks agree on skipped steps.
    # (loader.dataset is the SeededDataset around the training set.)
    agree_on_skips = context.enabled and loader.dataset.dataset.skip_bad_images
    for batch in progress_bar:
        skipped += int(batch["skipped"])
        inputs = step_batch(batch, placement, agree_on_skips)
        if inputs is not None:
            loss = train_step(model, *inputs, optimisation, placement.hardware)
            log.add(progress.iteration + 1, loss, optimisation.lr, len(inputs[0]))
        step_schedule(optimisation.scheduler)
        progress.iteration += 1
        boundary.after_step(progress)
    if skipped and context.is_main:
        print(f"epoch {progress.epoch}: skipped {skipped} bad samples (--skip-bad-images)")


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               optimisation: Optimisation, hardware: Hardware) -> torch.Tensor:
    """One forward/backward/update; returns the (device) loss. In fp16 the GradScaler skips the
    update on an inf/NaN gradient and halves its scale; the schedule steps all the same
    (:func:`utils.lr_scheduler.step_schedule`). A non-finite *loss* is TrainLog's to report; a
    skipped step with a finite loss is no divergence. Clipping would need ``unscale_`` first."""
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


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, settings: dict, placement: Placement,
             options: EvaluationOptions, stop: StopFlag | None = None) -> Evaluation:
    """Score full-resolution predictions of every val image (summed over ranks), keeping the
    ``options.worst`` worst of all ranks. ``stop`` ends it within a few batches (Interrupted): a
    full COCO val takes minutes, longer than a pre-emption grace period."""
    model.eval()
    hardware, context, class_names = placement.hardware, placement.context, settings["class_names"]
    evaluator, first = Evaluator(len(class_names), device=hardware.device), None
    worst = worst_images_tracker(options.worst, settings, loader)
    common_batches = len(loader.dataset) // context.world_size // (loader.batch_size or 1)
    progress_bar = tqdm(loader, desc="val", disable=not context.is_main, dynamic_ncols=True)
    with cudnn_benchmark(False):  # every full-resolution image has its own size
        for index, batch in enumerate(progress_bar):
            if eval_stop_requested(stop, index, common_batches, placement):
                raise stop.interrupted()
            if "image" not in batch:
                continue
            image, target = hardware.inputs(batch)
            # The prediction inference.py writes for the same image (one shared function).
            with hardware.autocast():
                prediction = predict_labels(model, image, tuple(target.shape[-2:]),
                                            list(options.scales), options.flip)
            evaluator.add_batch(target, prediction)
            if worst is not None:
                worst.add(batch["index"].tolist(), image, target, prediction)
            first = first or grid_batch(image, target, prediction)  # for TensorBoard
    evaluator.all_reduce()
    if worst is not None:
        worst.all_gather()
    return Evaluation(evaluator.results(class_names), evaluator.format_table(class_names),
                      first, worst)


def evaluate_epoch(model: nn.Module, val_loader, options: EvaluationOptions, *,
                   progress: TrainProgress, checkpointer: Checkpointer, placement: Placement,
                   stop: StopFlag) -> dict:
    """Evaluate after an epoch, save (model_best too when best), then report; returns the
    metrics. Interrupted, it saves the trained epoch with its evaluation owed (``eval_pending``):
    ``--resume`` evaluates it."""
    try:
        evaluation = evaluate(model, val_loader, settings=checkpointer.settings,
                              placement=placement, options=options, stop=stop)
    except Interrupted:
        checkpointer.save(progress)
        raise
    checkpointer.save_evaluated(progress, evaluation.results["mean_iou"])
    report_epoch(evaluation, progress=progress, checkpointer=checkpointer)
    return evaluation.results


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
