"""The fp16 path (autocast + GradScaler) that GPUs older than compute capability 8.0 take, run on
the CPU: skipped steps, the learning-rate schedule around them, NaN detection, the scaler's
state in checkpoints."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from dataloader.datasets.demo import generate_demo_dataset
from utils.hardware import Hardware
from utils.losses import OutputsLoss
from utils.lr_scheduler import build_lr_scheduler
from utils.optim import Optimisation, grad_scaler
from utils.distributed import DistributedContext
from utils.hardware import Placement
from utils.plan import resolve_plan
from utils.run_folder import TrainProgress, checkpoint_contents, resume_training
from model_testing import record_used_lrs

CPU_FP16 = Hardware(device=torch.device("cpu"), gpu_ids=[], amp_dtype=torch.float16,
                    channels_last=False)
#: GradScaler's defaults: the first scale, and the factor an inf/NaN step multiplies it by.
INITIAL_SCALE, BACKOFF = 2.0 ** 16, 0.5
LR = 0.01
# ResNet-18 at 32 pixels: fp16 convolutions are emulated on most CPUs, and slow.
TINY_FP16 = ["--backbone", "resnet18", "--no-pretrained", "--no-cuda", "--amp", "fp16",
             "--crop-size", "32", "--base-size", "32", "--eval-size", "32", "--dataset", "demo",
             "--batch-size", "2", "--lr", str(LR), "--epochs", "1", "--workers", "0",
             "--print-freq", "1", "--eval-worst", "0"]


class TinySegmenter(nn.Module):
    """Two classes from a 1x1 convolution: the model's output dict, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def tiny_optimisation(model: nn.Module, total_iters: int = 10) -> Optimisation:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return Optimisation(criterion=OutputsLoss(nn.CrossEntropyLoss(ignore_index=255)),
                        optimizer=optimizer,
                        scheduler=build_lr_scheduler(optimizer, "poly", total_iters=total_iters),
                        scaler=grad_scaler(CPU_FP16.device, CPU_FP16.amp_dtype))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 8, 8, generator=generator),
            torch.randint(0, 2, (2, 8, 8), generator=generator))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_step_with_a_non_finite_gradient_is_skipped_and_the_scale_halves(bad):
    torch.manual_seed(0)
    model = TinySegmenter()
    optimisation = tiny_optimisation(model)
    before = weights(model)
    hook = model.conv.weight.register_hook(lambda grad: torch.full_like(grad, bad))
    loss = train.train_step(model, *batch(), optimisation, CPU_FP16)
    hook.remove()

    assert math.isfinite(loss.item())  # only the gradient is bad
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # bias included: the whole step skipped
    assert optimisation.optimizer.state == {}  # no momentum buffer either
    assert optimisation.scaler.get_scale() == INITIAL_SCALE * BACKOFF

    # The next, finite step updates the weights and keeps the scale (it grows only after
    # growth_interval = 2000 good steps in a row).
    train.train_step(model, *batch(), optimisation, CPU_FP16)
    assert not torch.equal(model.conv.weight, before["conv.weight"])
    assert optimisation.scaler.get_scale() == INITIAL_SCALE * BACKOFF
    assert optimisation.scaler.state_dict()["_growth_tracker"] == 1


def test_fp16_step_matches_fp32_on_the_same_batch():
    # The scale is undone before the update: one fp16 step moves the weights as fp32 does, up
    # to fp16 rounding of the activations (not by a factor of 65536).
    torch.manual_seed(0)
    fp16_model = TinySegmenter()
    fp32_model = TinySegmenter()
    fp32_model.load_state_dict(fp16_model.state_dict())
    start = weights(fp16_model)["conv.weight"]
    train.train_step(fp16_model, *batch(), tiny_optimisation(fp16_model), CPU_FP16)
    fp32 = dataclasses.replace(CPU_FP16, amp_dtype=None)
    fp32_optimisation = dataclasses.replace(tiny_optimisation(fp32_model), scaler=None)
    train.train_step(fp32_model, *batch(), fp32_optimisation, fp32)
    fp16_update = fp16_model.conv.weight.detach() - start
    fp32_update = fp32_model.conv.weight.detach() - start
    assert fp32_update.abs().max() > 0
    torch.testing.assert_close(fp16_update, fp32_update, rtol=2e-2, atol=1e-5)


def test_the_scaler_state_round_trips_through_a_checkpoint():
    model = TinySegmenter()
    optimisation = tiny_optimisation(model)
    hook = model.conv.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    train.train_step(model, *batch(), optimisation, CPU_FP16)  # skipped: the scale halves
    hook.remove()
    for _ in range(3):  # three good steps since the last change of scale
        train.train_step(model, *batch(), optimisation, CPU_FP16)
    plan = resolve_plan(train_size=20, batch_size=2, epochs=1, lr=LR, print_freq=1,
                        placement=Placement(CPU_FP16, DistributedContext()))
    saved = checkpoint_contents(model=model, optimisation=optimisation,
                                progress=TrainProgress(iteration=3), plan=plan, settings={})
    fresh = tiny_optimisation(TinySegmenter())
    resume_training(saved, optimisation=fresh, plan=plan, seed=1)
    assert fresh.scaler.state_dict() == {"scale": INITIAL_SCALE * BACKOFF, "growth_factor": 2.0,
                                         "backoff_factor": 0.5, "growth_interval": 2000,
                                         "_growth_tracker": 3}


# --------------------------------------------------------------------------- train.py itself


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    # 8 train images: one epoch of 4 steps of 2.
    root = tmp_path_factory.mktemp("fp16") / "demo"
    generate_demo_dataset(root, seed=1, num_train=8, num_val=2, image_size=(40, 32))
    return root


#: A first scale low enough that no step of these runs overflows fp16 on its own (at the default
#: 2**16 the first steps of a new model do, and are skipped while the scale comes down).
LOW_SCALE = 2.0 ** 8


def fault_at_step(patch: pytest.MonkeyPatch, step: int, fault: str) -> list[float]:
    """Make train.py's step ``step`` (1-based) produce an inf gradient (``"gradient"``) or an
    inf loss (``"loss"``), the only skipped step (the scaler starts at :data:`LOW_SCALE`);
    returns the GradScaler's scale after each step."""
    real_step, scales = train.train_step, []
    patch.setattr(train, "grad_scaler", lambda device, dtype: torch.amp.GradScaler(
        device.type, init_scale=LOW_SCALE))

    def faulty(model, images, targets, optimisation, hardware):
        hooks = []
        if len(scales) + 1 == step and fault == "gradient":
            parameter = next(model.parameters())
            hooks.append(parameter.register_hook(lambda grad: torch.full_like(grad, math.inf)))
        if len(scales) + 1 == step and fault == "loss":
            criterion = optimisation.criterion
            optimisation = dataclasses.replace(optimisation, criterion=lambda outputs, target:
                                               criterion(outputs, target) * math.inf)
        loss = real_step(model, images, targets, optimisation, hardware)
        for hook in hooks:
            hook.remove()
        scales.append(optimisation.scaler.get_scale())
        return loss

    patch.setattr(train, "train_step", faulty)
    return scales


def poly_lr(step: int, total: int) -> float:
    """The poly schedule's rate for 1-based step ``step`` of ``total``, by hand."""
    return LR * (1 - (step - 1) / total) ** 0.9


def test_an_inf_gradient_skips_one_step_and_the_schedule_moves_on(demo_root, tmp_path,
                                                                  monkeypatch, recwarn):
    scales = fault_at_step(monkeypatch, 1, "gradient")
    used = record_used_lrs(monkeypatch)
    result = train.main(train.get_args_parser().parse_args(
        TINY_FP16 + ["--data-root", str(demo_root), "--run-dir", str(tmp_path / "run")]))

    # Training went on to its end: a skipped step with a finite loss is not a divergence,
    # though the NaN check ran after every step (--print-freq 1).
    assert result["iteration"] == 4
    assert scales == [LOW_SCALE * BACKOFF] * 4
    # Step 1 made no update, and its rate was used by none: the schedule counts iterations
    # (torchvision's rule), so step 2 runs at step 2's rate, not at step 1's.
    assert used == pytest.approx([poly_lr(2, 4), poly_lr(3, 4), poly_lr(4, 4)])
    # ...without PyTorch's warning that the schedule stepped before the optimiser did.
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["scheduler"]["last_epoch"] == 4
    assert checkpoint["scaler"]["scale"] == LOW_SCALE * BACKOFF
    assert checkpoint["scaler"]["_growth_tracker"] == 3  # steps 2, 3 and 4


def test_an_inf_loss_in_fp16_stops_training_with_the_last_good_checkpoint(demo_root, tmp_path,
                                                                          monkeypatch, capsys):
    # The scaler skips the step (the weights stay finite), but a forward pass that overflows
    # fp16 is not the scaler's to hide: the run stops as in fp32, naming the iteration.
    scales = fault_at_step(monkeypatch, 2, "loss")
    run_dir = tmp_path / "run"
    status = train.cli(TINY_FP16 + ["--data-root", str(demo_root), "--run-dir", str(run_dir),
                                    "--save-interval", "1"])
    assert status == 3
    assert "loss is inf at iteration 2" in capsys.readouterr().err
    assert scales == [LOW_SCALE, LOW_SCALE * BACKOFF]  # step 2 was skipped
    checkpoint = torch.load(run_dir / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["iteration"] == 1  # nothing saved after the inf
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
