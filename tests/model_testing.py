"""Helpers the model, checkpoint and training tests share."""
from __future__ import annotations

import pytest
import torch


class Payload:
    """Any Python object: a file holding one needs unsafe (``weights_only=False``) unpickling."""


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with random weights and non-trivial BatchNorm statistics (not 0 mean
    and unit variance, and a batch count), so that any tensor a conversion or a load drops or
    misplaces shows in the outputs or in an equality check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
            elif tensor.is_floating_point():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def record_used_lrs(patch: pytest.MonkeyPatch) -> list[float]:
    """The backbone learning rate of every SGD update actually made."""
    used, real_step = [], torch.optim.SGD.step

    def step(self, closure=None):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, closure)

    patch.setattr(torch.optim.SGD, "step", step)
    return used
