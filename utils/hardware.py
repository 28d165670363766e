"""Device, precision and model wrapping, shared by train.py and inference.py.

One place decides where a model runs (CPU, one GPU, DataParallel over several, one GPU per
torchrun process), in which precision (``--amp``) and memory format (``--channels-last``), and
wraps it accordingly (SyncBatchNorm, DistributedDataParallel / DataParallel, ``torch.compile``).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from utils.distributed import DEFAULT_TIMEOUT_MINUTES, DistributedContext, any_true
from utils.errors import UserError

logger = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
CPUINFO = "/proc/cpuinfo"  # Linux's CPU flags, where torch's own AMX check is missing


def add_hardware_args(group: argparse._ArgumentGroup, *, channels_last: bool | None) -> None:
    """The device and precision flags train.py and inference.py share: ``--no-cuda``, ``--amp``,
    ``--channels-last`` (default ``channels_last``; None means on for GPUs) and ``--compile``."""
    group.add_argument("--no-cuda", action="store_true", help="use the CPU even with a GPU")
    group.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help="precision; auto: bf16 on GPUs of compute capability 8+, fp16 on "
                            "older GPUs, fp32 on CPUs (bf16 there is an opt-in: --amp bf16; "
                            "fp16 on a CPU runs, slowly, to test the GPU fp16 path)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       default=channels_last, help="channels_last memory format" + (
                           " (default: on for GPUs)" if channels_last is None else ""))
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (pays off on long runs)")


def add_training_hardware_args(parser: argparse.ArgumentParser) -> None:
    """train.py's device flags: :func:`add_hardware_args`, DataParallel's GPUs, the DDP timeout
    and SyncBatchNorm."""
    hw = parser.add_argument_group("hardware")
    add_hardware_args(hw, channels_last=None)
    hw.add_argument("--gpu-ids", help="GPUs for DataParallel, e.g. 0,1 (default: all)")
    hw.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                    help="minutes a torchrun rank may wait in a collective before failing")
    hw.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                    help="SyncBatchNorm across processes (default: on under torchrun on GPUs)")


@dataclass
class Hardware:
    """Where this process computes and how.

    Attributes:
        device: the device inputs and the model go to.
        gpu_ids: DataParallel devices in this process (empty on CPU).
        amp_dtype: the autocast dtype, or None for full precision.
        channels_last: whether inputs and the model use the channels_last memory format.
    """

    device: torch.device
    gpu_ids: list[int]
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def devices_per_process(self) -> int:
        return max(len(self.gpu_ids), 1)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """A ``(N, 3, H, W)`` batch on the device, in the chosen memory format."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's images (in the chosen memory format) and labels, on the device."""
        return self.images(batch["image"]), batch["label"].to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)


@dataclass(frozen=True)
class Placement:
    """Where this process computes: its device and precision (``hardware``) and its rank among
    the processes training together (``context``). The two travel together to every part of the
    loop that needs both."""

    hardware: Hardware
    context: DistributedContext


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th generation and later), the one kind of CPU
    where ``--amp bf16`` may beat fp32: AVX512-BF16 without AMX ran it slower (doc/deployment.md)."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return True
    except (AttributeError, RuntimeError):  # a private helper: read the kernel's flags instead
        pass
    try:
        with open(CPUINFO, encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "amx_tile"} & set(flags.split()))


def cpu_bf16_note(amp: str, device: torch.device, *, measure_with: str) -> str | None:
    """One line for ``--amp auto`` on a CPU with AMX: fp32 was chosen, ``--amp bf16`` may be
    faster there, and ``measure_with`` (a command) compares the two; None everywhere else."""
    if amp != "auto" or device.type != "cpu" or not cpu_has_amx():
        return None
    return (f"note: --amp auto runs fp32 on CPUs; this one has AMX, where --amp bf16 may be "
            f"faster (its masks differ slightly): measure both with `{measure_with}`")


def auto_amp_dtype(device_type: str, *,
                   cuda_capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """What ``--amp auto`` picks: bf16 on GPUs of compute capability 8.0 and later, fp16 on older
    GPUs, fp32 (None) on CPUs.

    ``torch.cuda.is_bf16_supported()`` also counts emulated bf16, which on a V100 or T4
    (capability 7.x) is far slower than fp16, so the capability decides. On CPUs bf16 is an
    opt-in whatever the CPU reports: it changes some pixels of the masks, and on a CPU with
    AVX512-BF16 but no AMX it was slower than fp32 too, so a default that followed the CPU flag
    would give different answers, slower, from one machine to the next.
    """
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) \
            else torch.float16
    return None


#: Said once when ``--amp fp16`` runs on a CPU.
CPU_FP16_NOTE = ("--amp fp16 on a CPU is meant for testing the GPU fp16 path (autocast with a "
                 "GradScaler, as on GPUs older than compute capability 8.0); it is many times "
                 "slower than fp32 here: use --amp off or bf16 for real work")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Map ``--amp auto|off|bf16|fp16`` to an autocast dtype (None = full precision).

    ``fp16`` runs on a CPU too, with a warning (:data:`CPU_FP16_NOTE`): CPUs without AVX512-FP16
    emulate it, far slower than fp32, but it lets the suite run the GradScaler path (scaling,
    skipped steps, the scaler's state on resume) that fp16 GPUs take. ``auto`` never picks it
    on a CPU.
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "auto":
            return auto_amp_dtype("cuda", cuda_capability=torch.cuda.get_device_capability(device))
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        logger.warning(CPU_FP16_NOTE)
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return auto_amp_dtype("cpu")


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` inside the block, restore it after.

    Training crops have one size, where tuning pays; full-resolution evaluation sees a new size
    with nearly every image, and would re-tune the convolutions for each.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def backward_kernels(hardware: Hardware) -> Iterator[None]:
    """The kernels ``backward()`` runs with: the defaults, except fp16 on a CPU, where oneDNN
    (``torch.backends.mkldnn``) is off inside the block.

    oneDNN has no fp16 convolution-backward kernel for CPUs without AVX512-FP16 and falls back
    to a reference one, several times slower than PyTorch's own (doc/gpu.md has the numbers);
    fp16 on a CPU exists for tests, which should not wait for it. GPUs are not affected.
    """
    if hardware.device.type != "cpu" or hardware.amp_dtype != torch.float16:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def dataparallel_chunks(batch_size: int, devices: int) -> list[int]:
    """The images each device gets when DataParallel scatters a batch (``torch.chunk``'s
    split: 10 over 4 GPUs is 3, 3, 3, 1; some devices may get none)."""
    return [len(chunk) for chunk in torch.arange(batch_size).chunk(devices)]


def usable_batch_size(batch_size: int, devices: int) -> int:
    """The largest number of a batch's images, at most ``batch_size``, that gives every device
    that receives any at least 2 (the ASPP image-pooling BatchNorm needs 2); 0 if none does."""
    for size in range(batch_size, 1, -1):
        if min(dataparallel_chunks(size, devices)) >= 2:
            return size
    return 0


def step_batch(batch: dict[str, Any], placement: Placement,
               agree: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of a loaded training batch one step trains on (on the device), or None to skip
    the step.

    BatchNorm in ASPP's image pooling needs 2 images per device: a batch that
    ``--skip-bad-images`` shrank is cut to the largest size DataParallel splits into chunks of
    at least 2, or skipped. With ``agree`` (DDP with skipping), the ranks skip together: a rank
    that sat out would leave the others waiting in SyncBatchNorm and the gradient all-reduce.
    """
    hardware = placement.hardware
    size = len(batch["image"]) if "image" in batch else 0
    usable = usable_batch_size(size, hardware.devices_per_process)
    if agree and any_true(usable == 0, placement.context, hardware.device):
        return None
    if usable == 0:
        return None
    return hardware.inputs({"image": batch["image"][:usable], "label": batch["label"][:usable]})

def _gpu_ids(spec: str | None, available: int) -> list[int]:
    try:
        ids = list(range(available)) if spec is None else [
            int(i) for i in spec.split(",") if i.strip()]
    except ValueError:
        raise UserError(f"--gpu-ids {spec!r} is not a comma-separated list of integers") from None
    bad = [i for i in ids if not 0 <= i < available]
    if bad or not ids:
        raise UserError(f"--gpu-ids {spec} names GPUs {bad}, but this machine has "
                        f"{available} (ids 0-{available - 1})")
    return ids


def resolve_hardware(
    *,
    no_cuda: bool,
    gpu_ids: str | None,
    amp: str,
    channels_last: bool | None,
    context: DistributedContext,
) -> Hardware:
    """The device(s), precision and memory format the flags ask for on this machine.

    Args:
        no_cuda: stay on the CPU even when a GPU is present.
        gpu_ids: ``--gpu-ids`` as typed (``"0,1"``), or None for every GPU; ignored under torchrun,
            where each process drives the GPU of its local rank.
        amp: ``--amp`` (see :func:`resolve_amp`).
        channels_last: ``--channels-last``; None means on for GPUs.
        context: this process's place in a torchrun job.
    """
    use_cuda = torch.cuda.is_available() and not no_cuda
    if context.enabled:
        device = torch.device("cuda", context.local_rank) if use_cuda else torch.device("cpu")
        ids = [context.local_rank] if use_cuda else []
    elif use_cuda:
        ids = _gpu_ids(gpu_ids, torch.cuda.device_count())
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


class AutocastReplica(nn.Module):
    """Runs ``module`` under autocast in ``dtype``, whatever thread calls it.

    DataParallel's ``parallel_apply`` re-enters autocast in each replica's thread with
    ``enabled`` only, so the dtype there falls back to the device's default (fp16 on CUDA): a
    bf16 run would compute its replicas in fp16, without a GradScaler. Only the DataParallel
    wrapper holds this module; checkpoints save the plain model, so their keys do not change.
    """

    def __init__(self, module: nn.Module, *, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*inputs, **kwargs)


def prepare_model(
    model: nn.Module,
    hardware: Hardware,
    *,
    context: DistributedContext,
    sync_bn: bool | None,
    compile_model: bool,
) -> tuple[nn.Module, nn.Module, bool]:
    """Move ``model`` to the device and wrap it for this hardware.

    Args:
        sync_bn: SyncBatchNorm across processes; None means on under torchrun with GPUs.
        compile_model: ``torch.compile`` the wrapped model.

    Returns:
        ``(model to call, plain model, sync_bn used)``: the plain model shares its parameters with
        the wrapped one and is what evaluation and checkpoints use.

    Raises:
        UserError: ``sync_bn`` asked for on CPUs under torchrun.
    """
    # PyTorch's SyncBatchNorm runs on GPUs only; CPU processes keep per-process statistics
    # (DDP still broadcasts rank 0's running statistics, so the ranks stay identical).
    on_gpu = hardware.device.type == "cuda"
    if sync_bn and not context.enabled:
        # DataParallel computes BatchNorm statistics on each GPU's chunk, and one process has no
        # other process to synchronise with: the flag would change nothing.
        logger.warning("--sync-bn has no effect without torchrun (DataParallel keeps per-GPU "
                       "BatchNorm statistics): training without it")
        sync_bn = False
    sync_bn = sync_bn if sync_bn is not None else context.enabled and on_gpu
    if sync_bn and not on_gpu:
        raise UserError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm is CUDA-only): "
                        "drop it on CPUs")
    if sync_bn and context.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(hardware.device)
    if hardware.channels_last:
        model.to(memory_format=torch.channels_last)
    plain_model = model
    if context.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=hardware.gpu_ids or None)
    elif len(hardware.gpu_ids) > 1:
        if hardware.amp_dtype is not None:
            model = AutocastReplica(model, device_type=hardware.device.type,
                                    dtype=hardware.amp_dtype)
        model = nn.DataParallel(model, device_ids=hardware.gpu_ids)
    if compile_model:
        model = torch.compile(model)
    return model, plain_model, sync_bn


def resolve_placement(*, no_cuda: bool, gpu_ids: str | None, amp: str,
                      channels_last: bool | None, context: DistributedContext) -> Placement:
    """train.py's device and precision (:func:`resolve_hardware`) with its rank, saying so on
    rank 0 where ``--amp auto`` may be slower than it could be (:func:`cpu_bf16_note`)."""
    hardware = resolve_hardware(no_cuda=no_cuda, gpu_ids=gpu_ids, amp=amp,
                                channels_last=channels_last, context=context)
    note = cpu_bf16_note(amp, hardware.device, measure_with="python -m bench.train_step")
    if note and context.is_main:
        print(note)
    return Placement(hardware, context)
