"""Learning-rate schedules against their formulas, written out here independently of the code."""
import io
import math
import sys

import pytest
import torch
from PIL import Image

from scripts import plot_lr_schedules
from utils.lr_scheduler import SCHEDULERS, build_lr_scheduler

BASE_LR = 0.01

pytestmark = pytest.mark.filterwarnings("error")  # e.g. "step() called before optimizer.step()"


def make_optimizer(*base_lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(groups, lr=base_lrs[0], momentum=0.9)


def run_lrs(scheduler, optimizer, iterations: int) -> list[list[float]]:
    """The rates used for the next ``iterations`` iterations, one list per iteration."""
    used = []
    for _ in range(iterations):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


def expected_warmup(t: int, warmup: int, factor: float) -> float:
    return BASE_LR * (factor + (1 - factor) * t / warmup)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, BASE_LR * 0.001),  # warmup starts at f * b
        (5, expected_warmup(5, 10, 0.001)),
        (9, expected_warmup(9, 10, 0.001)),
        (10, BASE_LR),  # s = 0
        (55, BASE_LR * (1 - 45 / 90) ** 0.9),
        (99, BASE_LR * (1 - 89 / 90) ** 0.9),
        (100, 0.0),  # s clamped at S = 90
        (130, 0.0),
    ],
)
def test_poly_with_warmup(t, expected):
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(optimizer, "poly", total_iters=100, warmup_iters=10, power=0.9)
    assert run_lrs(scheduler, optimizer, t + 1)[t][0] == pytest.approx(expected, abs=1e-12)


def test_poly_without_warmup_starts_at_base_lr_and_decays():
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(optimizer, "poly", total_iters=50, power=2.0)
    lrs = [row[0] for row in run_lrs(scheduler, optimizer, 50)]
    assert lrs[0] == BASE_LR
    assert lrs[25] == pytest.approx(BASE_LR * (1 - 25 / 50) ** 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, BASE_LR * 0.1),  # warmup_factor 0.1
        (4, BASE_LR * (0.1 + 0.9 * 4 / 5)),
        (5, BASE_LR),
        (29, BASE_LR),
        (30, BASE_LR * 0.5),  # 30 // 30 = 1, counted from t = 0
        (65, BASE_LR * 0.25),  # 65 // 30 = 2
        (95, BASE_LR * 0.125),
    ],
)
def test_step_with_warmup(t, expected):
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(
        optimizer, "step", total_iters=100, warmup_iters=5, warmup_factor=0.1, step_size=30,
        gamma=0.5,
    )
    assert run_lrs(scheduler, optimizer, t + 1)[t][0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, BASE_LR * 0.001),
        (10, BASE_LR),  # cos(0) = 1
        (40, BASE_LR * 0.5 * (1 + math.cos(math.pi * 30 / 120))),
        (70, BASE_LR * 0.5),  # halfway: s = 60 of S = 120
        (129, BASE_LR * 0.5 * (1 + math.cos(math.pi * 119 / 120))),
        (131, 0.0),  # clamped at the end, not rising again
    ],
)
def test_cosine_with_warmup(t, expected):
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(optimizer, "cos", total_iters=130, warmup_iters=10)
    assert run_lrs(scheduler, optimizer, t + 1)[t][0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_param_group_keeps_its_own_base_lr(name):
    optimizer = make_optimizer(BASE_LR, 10 * BASE_LR)  # backbone 1x, head 10x
    scheduler = build_lr_scheduler(optimizer, name, total_iters=60, warmup_iters=6, step_size=20)
    for backbone, head in run_lrs(scheduler, optimizer, 60):
        assert head == pytest.approx(10 * backbone, rel=1e-12)
    assert scheduler.base_lrs == [BASE_LR, 10 * BASE_LR]


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("load_optimizer_state", [True, False])
def test_resume_from_state_dict_matches_uninterrupted_run(name, load_optimizer_state):
    kwargs = dict(total_iters=80, warmup_iters=8, step_size=25, power=0.9)
    optimizer = make_optimizer(BASE_LR, 10 * BASE_LR)
    scheduler = build_lr_scheduler(optimizer, name, **kwargs)
    uninterrupted = run_lrs(scheduler, optimizer, 80)

    optimizer = make_optimizer(BASE_LR, 10 * BASE_LR)
    scheduler = build_lr_scheduler(optimizer, name, **kwargs)
    first_part = run_lrs(scheduler, optimizer, 37)
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain types only

    resumed_optimizer = make_optimizer(BASE_LR, 10 * BASE_LR)
    resumed = build_lr_scheduler(resumed_optimizer, name, **kwargs)
    if load_optimizer_state:
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.last_epoch == 37
    second_part = run_lrs(resumed, resumed_optimizer, 43)
    assert first_part + second_part == uninterrupted  # exactly, float for float


def test_bad_arguments_raise_value_error():
    optimizer = make_optimizer(BASE_LR)
    with pytest.raises(ValueError, match="poly, step, cos"):
        build_lr_scheduler(optimizer, "linear", total_iters=10)
    with pytest.raises(ValueError, match="step_size"):
        build_lr_scheduler(optimizer, "step", total_iters=10)
    with pytest.raises(ValueError, match="warmup_iters"):
        build_lr_scheduler(optimizer, "poly", total_iters=10, warmup_iters=10)
    with pytest.raises(ValueError, match="total_iters"):
        build_lr_scheduler(optimizer, "cos", total_iters=0)


def test_plot_script_writes_readable_pngs(tmp_path):
    plot_lr_schedules.main(["--out-dir", str(tmp_path)])
    for name in ("poly.png", "stepdecay.png", "cosine.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 250
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 2  # not blank


def test_plot_script_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_lr_schedules.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -r requirements-plot.txt" in err
    assert not any(tmp_path.iterdir())


def test_resume_for_more_epochs_follows_the_new_schedule_and_says_so(caplog):
    # A 100-iteration poly run resumed at iteration 100 for 200 iterations: the old curve is at
    # rate 0 there, the new one at (1 - 100/200)^0.9 of the base rate.
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(optimizer, "poly", total_iters=100)
    run_lrs(scheduler, optimizer, 100)
    assert optimizer.param_groups[0]["lr"] == 0.0
    resumed_optimizer = make_optimizer(BASE_LR)
    resumed = build_lr_scheduler(resumed_optimizer, "poly", total_iters=200)
    with caplog.at_level("WARNING", logger="utils.lr_scheduler"):
        resumed.load_state_dict(scheduler.state_dict())
    assert "total_iters 100 -> 200" in caplog.text
    assert resumed.total_iters == 200 and resumed.last_epoch == 100
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.5 ** 0.9)
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * (99 / 200) ** 0.9)


def test_resume_with_the_same_schedule_is_silent(caplog):
    optimizer = make_optimizer(BASE_LR)
    scheduler = build_lr_scheduler(optimizer, "poly", total_iters=100)
    run_lrs(scheduler, optimizer, 10)
    resumed_optimizer = make_optimizer(BASE_LR)
    resumed = build_lr_scheduler(resumed_optimizer, "poly", total_iters=100)
    with caplog.at_level("WARNING", logger="utils.lr_scheduler"):
        resumed.load_state_dict(scheduler.state_dict())
    assert caplog.text == ""
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * (1 - 10 / 100) ** 0.9)


def test_resume_with_another_lr_momentum_and_weight_decay_applies_them_and_says_so(caplog):
    # Trained 40 of 100 poly iterations at 0.01 (head 0.1), momentum 0.9; resumed with
    # --lr 0.005 --momentum 0.8 --weight-decay 0.001 --nesterov, restored as
    # utils.run_folder.resume_training does: the new values run from iteration 40 on.
    from utils.optim import load_optimizer_state

    def sgd(lr: float, **kwargs) -> torch.optim.SGD:
        params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
        for param in params:
            param.grad = torch.full((2,), 0.5)
        return torch.optim.SGD([{"params": params[:1], "lr": lr},
                                {"params": params[1:], "lr": 10 * lr}], lr=lr, **kwargs)

    optimizer = sgd(BASE_LR, momentum=0.9, weight_decay=1e-4)
    scheduler = build_lr_scheduler(optimizer, "poly", total_iters=100)
    run_lrs(scheduler, optimizer, 40)
    resumed_optimizer = sgd(BASE_LR / 2, momentum=0.8, weight_decay=1e-3, nesterov=True)
    resumed = build_lr_scheduler(resumed_optimizer, "poly", total_iters=100)
    with caplog.at_level("WARNING"):
        load_optimizer_state(resumed_optimizer, optimizer.state_dict(), iteration=40)
        resumed.load_state_dict(scheduler.state_dict())
    factor = (1 - 40 / 100) ** 0.9
    assert [group["lr"] for group in resumed_optimizer.param_groups] == pytest.approx(
        [0.005 * factor, 0.05 * factor])
    for group in resumed_optimizer.param_groups:
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 1e-3, True)
    assert "base_lrs [0.01, 0.1] -> [0.005, 0.05]" in caplog.text
    assert "momentum 0.9 -> 0.8, weight_decay 0.0001 -> 0.001, nesterov False -> True" \
        in caplog.text
    # The momentum buffers still come from the checkpoint.
    old_buffer = optimizer.state[optimizer.param_groups[0]["params"][0]]["momentum_buffer"]
    new_buffer = resumed_optimizer.state[resumed_optimizer.param_groups[0]["params"][0]][
        "momentum_buffer"]
    assert torch.equal(new_buffer, old_buffer) and old_buffer.abs().sum() > 0
