"""Helpers the model and checkpoint tests share."""
from __future__ import annotations

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
