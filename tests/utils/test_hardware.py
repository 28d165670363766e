"""Faults that hit real clusters, tested through their decision logic on the CPU: DataParallel
chunks, agreed skips under DDP, the autocast dtype per GPU generation (and fp32 on every CPU),
the dtype of DataParallel's replicas, cudnn tuning during evaluation and inference, the
process-group timeout and the classifier's initial loss."""
from __future__ import annotations

import datetime
import math
import socket
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import deploy.predictor
import inference
import train
from modeling.deeplab import DeepLab
from utils import distributed, hardware
from utils.distributed import DistributedContext
from train import evaluate
from utils.errors import UserError
from utils.evaluation_report import EvaluationOptions
from utils.hardware import (AutocastReplica, Hardware, Placement, auto_amp_dtype, cpu_bf16_note,
                            dataparallel_chunks, prepare_model, resolve_amp, resolve_hardware,
                            step_batch, usable_batch_size)

CPU = Hardware(device=torch.device("cpu"), gpu_ids=[], amp_dtype=None, channels_last=False)


def alone(hardware: Hardware) -> Placement:
    """``hardware`` in a process that trains alone (no torchrun)."""
    return Placement(hardware, DistributedContext())


def gpus(count: int) -> Hardware:
    """A DataParallel set-up of ``count`` GPUs, as far as batch planning is concerned."""
    return Hardware(device=torch.device("cpu"), gpu_ids=list(range(count)), amp_dtype=None,
                    channels_last=False)


def batch_of(size: int, skipped: int = 0) -> dict:
    if size == 0:  # what collate_skipping_bad gives when every sample of a batch was bad
        return {"skipped": skipped}
    return {"image": torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(
        size, 3, 4, 4), "label": torch.zeros(size, 4, 4, dtype=torch.long), "skipped": skipped}


# ------------------------------------------------------------------ DataParallel chunk sizes


def test_dataparallel_splits_like_torch_chunk():
    # The splits the issue measured: one GPU would get a single image.
    assert dataparallel_chunks(10, 4) == [3, 3, 3, 1]
    assert dataparallel_chunks(22, 8) == [3] * 7 + [1]
    assert dataparallel_chunks(8, 4) == [2, 2, 2, 2]
    assert usable_batch_size(10, 4) == 9  # 3, 3, 3
    assert usable_batch_size(22, 8) == 21  # seven 3s
    assert usable_batch_size(3, 2) == 0  # 2 + 1 or 1 + 1
    assert usable_batch_size(1, 1) == 0 and usable_batch_size(2, 1) == 2


@pytest.mark.parametrize("batch, devices, suggestion", [(10, 4, 12), (22, 8, 24), (1, 1, 2)])
def test_a_batch_that_leaves_a_gpu_one_image_is_refused(batch, devices, suggestion):
    args = train.get_args_parser().parse_args(["--dataset", "demo", "--batch-size", str(batch)])
    with pytest.raises(UserError, match=f"use --batch-size {suggestion}$"):
        train.build_plan(args, 1000, alone(gpus(devices)))
    suggested = train.get_args_parser().parse_args(
        ["--dataset", "demo", "--batch-size", str(suggestion)])
    schedule = train.build_plan(suggested, 1000, alone(gpus(devices)))
    assert min(dataparallel_chunks(schedule.batch_size, devices)) >= 2


def test_a_batch_shrunk_by_skipped_images_is_cut_to_chunks_of_two():
    # 10 images on 4 GPUs would give the last one a single image: train on 9 (3, 3, 3).
    images, targets = step_batch(batch_of(10), alone(gpus(4)), agree=False)
    assert len(images) == len(targets) == 9
    assert images[:, 0, 0, 0].tolist() == list(range(9))
    assert step_batch(batch_of(3), alone(gpus(2)), agree=False) is None
    assert step_batch(batch_of(0, skipped=4), alone(CPU), agree=False) is None
    assert len(step_batch(batch_of(3), alone(CPU), agree=False)[0]) == 3


# ------------------------------------------------------------------ DDP ranks skip together


def _step_on_rank(rank: int, port: int, cases: list[list[int]], results) -> None:
    """Every case's step on this rank, in one process group (one spawn serves every case)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        context = DistributedContext(rank=rank, world_size=2)
        for case, sizes in enumerate(cases):
            inputs = step_batch(batch_of(sizes[rank], skipped=4 - sizes[rank]),
                                Placement(CPU, context), agree=True)
            results[case, rank] = 0 if inputs is None else len(inputs[0])
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Two ranks' batch sizes -> the sizes they train on: both skip, or both train.
SKIP_CASES = [([4, 0], [0, 0]), ([1, 4], [0, 0]), ([4, 3], [4, 3])]


@pytest.fixture(scope="module")
def two_rank_steps() -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_step_on_rank, args=(free_port(), [s for s, _ in SKIP_CASES], results),
                           nprocs=2, start_method="spawn")
        return dict(results)


@pytest.mark.parametrize("case", range(len(SKIP_CASES)),
                         ids=["-".join(map(str, sizes)) for sizes, _ in SKIP_CASES])
def test_ddp_ranks_agree_to_skip_a_step_one_of_them_cannot_take(case, two_rank_steps):
    # A rank whose batch lost its images (or kept one) must not leave the other in the
    # collectives of a step it does not take: both skip, or both train.
    sizes, expected = SKIP_CASES[case]
    assert [two_rank_steps[case, rank] for rank in range(2)] == expected


# ------------------------------------------------------------------ autocast dtype per GPU


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_amp_auto_picks_native_bf16_only_from_ampere_on(capability, dtype, monkeypatch):
    assert auto_amp_dtype("cuda", cuda_capability=capability) is dtype
    # torch.cuda.is_bf16_supported() counts emulation (True on a V100): it must not decide.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda", 0)) is dtype
    assert resolve_amp("fp16", torch.device("cuda", 0)) is torch.float16
    assert resolve_amp("off", torch.device("cuda", 0)) is None


def test_amp_auto_is_fp32_on_every_cpu(cpu_bf16):
    # Whatever the CPU reports (bf16 changes masks, and was slower on AVX512-BF16 without AMX).
    cpu = torch.device("cpu")
    assert auto_amp_dtype("cpu") is None
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16  # the opt-in
    assert train.get_args_parser().parse_args([]).amp == "auto"
    assert inference.get_args_parser().parse_args(["--in-path", "x"]).amp == "auto"
    # Training, evaluation and inference all take their precision from here.
    resolved = resolve_hardware(no_cuda=True, gpu_ids=None, amp="auto", channels_last=None,
                                context=DistributedContext())
    assert resolved.device.type == "cpu" and resolved.amp_dtype is None


def test_a_cpu_with_amx_is_told_how_to_measure_bf16(cpu_bf16):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    note = cpu_bf16_note("auto", cpu, measure_with="python -m bench.train_step")
    if cpu_bf16:  # the fixture reports AMX along with bf16
        assert "--amp bf16" in note and "python -m bench.train_step" in note
        assert len(note.splitlines()) == 1
    else:
        assert note is None
    # Nothing to say once the user chose, nor on a GPU.
    for amp, device in (("bf16", cpu), ("off", cpu), ("auto", gpu)):
        assert cpu_bf16_note(amp, device, measure_with="x") is None


@pytest.mark.parametrize("flags, expected", [
    ("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile amx_int8", True),  # a Sapphire Rapids Xeon
    ("flags\t\t: fpu avx2 avx512f avx512_bf16", False),  # AVX512-BF16 only
])
def test_amx_is_read_from_the_cpu_flags(flags, expected, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\n{flags}\n\n")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(hardware, "CPUINFO", str(cpuinfo))
    assert hardware.cpu_has_amx() is expected
    monkeypatch.setattr(hardware, "CPUINFO", str(tmp_path / "absent"))
    assert hardware.cpu_has_amx() is False


# ------------------------------------------------------------------ DataParallel replica dtype


@pytest.mark.parametrize("chosen, thread_default", [(torch.bfloat16, torch.float16),
                                                    (torch.float16, torch.bfloat16)])
def test_dataparallel_replicas_compute_in_the_chosen_dtype(chosen, thread_default):
    conv = torch.nn.Conv2d(3, 2, 1)
    two_gpus = Hardware(device=torch.device("cpu"), gpu_ids=[0, 1], amp_dtype=chosen,
                        channels_last=False)
    model, plain, _ = prepare_model(conv, two_gpus, context=DistributedContext(), sync_bn=None,
                                    compile_model=False)
    assert isinstance(model, torch.nn.DataParallel) and plain is conv
    assert list(plain.state_dict()) == ["weight", "bias"]  # checkpoints keep their keys
    seen = {}

    def replica_thread() -> None:
        # What parallel_apply does in each replica's thread: autocast re-entered with `enabled`
        # only, so the dtype is the thread's default (CUDA's is fp16).
        torch.set_autocast_dtype("cpu", thread_default)
        with torch.autocast("cpu", enabled=True):
            seen["dtype"] = model.module(torch.randn(2, 3, 4, 4)).dtype

    thread = threading.Thread(target=replica_thread)
    thread.start()
    thread.join()
    assert seen["dtype"] is chosen


def test_dataparallel_in_fp32_is_not_wrapped():
    conv = torch.nn.Conv2d(3, 2, 1)
    two_gpus = Hardware(device=torch.device("cpu"), gpu_ids=[0, 1], amp_dtype=None,
                        channels_last=False)
    model, _, _ = prepare_model(conv, two_gpus, context=DistributedContext(), sync_bn=None,
                                compile_model=False)
    assert model.module is conv and not isinstance(model.module, AutocastReplica)


# ------------------------------------------------------------------ no cudnn tuning in eval


class _RecordsCudnnBenchmark(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.benchmark)
        return {"out": torch.zeros(x.shape[0], 2, *x.shape[-2:])}


def test_evaluation_turns_cudnn_benchmark_off_and_restores_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = _RecordsCudnnBenchmark()
    data = [{"image": torch.zeros(3, 5 + i, 7), "label": torch.zeros(5 + i, 7, dtype=torch.long)}
            for i in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    evaluation = evaluate(model, loader, settings={"class_names": ["a", "b"]},
                          placement=alone(CPU), options=EvaluationOptions())
    assert model.seen == [False, False, False]
    assert torch.backends.cudnn.benchmark is True
    assert evaluation.results["pixels"] == 5 * 7 + 6 * 7 + 7 * 7


def test_inference_turns_cudnn_benchmark_off_and_restores_it(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen: list[bool] = []

    def engine(image: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(torch.backends.cudnn.benchmark)
        logits = torch.zeros(image.shape[0], 2, *image.shape[-2:])
        logits[:, 1] = 1.0  # class 1 everywhere
        return {"out": logits}

    settings = {"mean": [0.5] * 3, "std": [0.25] * 3, "palette": [[0, 0, 0], [255, 0, 0]]}
    monkeypatch.setattr(deploy.predictor, "load_engine", lambda ckpt, hardware, **options: (
        engine, settings, "torch"))
    (tmp_path / "in").mkdir()
    for index, size in enumerate([(9, 7), (8, 6)]):  # two sizes: tuning would run twice
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / "in" / f"{index}.png")
    assert inference.cli(["--in-path", str(tmp_path / "in"), "--out-path", str(tmp_path / "out"),
                          "--workers", "0", "--no-cuda"]) == 0
    assert seen == [False, False]
    assert torch.backends.cudnn.benchmark is True
    with Image.open(tmp_path / "out" / "0.png") as mask:
        assert mask.size == (9, 7) and mask.getextrema() == (1, 1)


# ------------------------------------------------------------------ process-group timeout


def test_process_group_gets_a_timeout_longer_than_rank_zeros_first_start(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    context = distributed.init_distributed(use_cuda=False, timeout_minutes=90)
    assert context.rank == 1 and context.world_size == 2
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(minutes=90)
    # The default is well past PyTorch's 10 minutes, and --dist-timeout sets it.
    assert train.get_args_parser().parse_args([]).dist_timeout == 60
    assert train.get_args_parser().parse_args(["--dist-timeout", "5"]).dist_timeout == 5


# ------------------------------------------------------------------ the first loss is ln(C)


@pytest.mark.parametrize("num_classes", [21, 171])
def test_initial_loss_is_near_log_of_the_class_count(num_classes):
    torch.manual_seed(0)
    model = DeepLab(backbone="resnet18", num_classes=num_classes, aux_loss=True).train()
    images = torch.randn(4, 3, 96, 96)
    targets = torch.randint(0, num_classes, (4, 96, 96))
    outputs = model(images)
    for name in ("out", "aux"):
        loss = torch.nn.functional.cross_entropy(outputs[name], targets).item()
        assert loss == pytest.approx(math.log(num_classes), abs=0.25), name
        assert outputs[name].std().item() < 1.0, name


# ------------------------------------------------------------------ the run's set-up per rank


def test_sync_bn_without_torchrun_is_said_to_do_nothing_and_recorded_off(caplog):
    # One process (DataParallel or none) has no other process to synchronise with.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    with caplog.at_level("WARNING"):
        wrapped, _, sync_bn = prepare_model(model, CPU, context=DistributedContext(),
                                            sync_bn=True, compile_model=False)
    assert sync_bn is False  # what train.py writes into settings.json
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--sync-bn" in warnings[0] and "torchrun" in warnings[0]


def test_training_ranks_read_disjoint_halves_of_each_epoch():
    # The loaders train.py builds for rank 0 and rank 1 of 2: together they read every sample of
    # the epoch once (were both built as rank 0, both would train on the same half).
    args = train.get_args_parser().parse_args(["--workers", "0", "--seed", "3"])
    dataset = list(range(12))
    halves = []
    for rank in (0, 1):
        _, sampler = train.build_loader(dataset, args, batch_size=2, shuffle=True,
                                        placement=Placement(CPU, DistributedContext(
                                            rank=rank, world_size=2)))
        sampler.set_epoch(1)
        halves.append([index for index, _ in sampler])
    assert len(halves[0]) == len(halves[1]) == 6
    assert sorted(halves[0] + halves[1]) == list(range(12))
