"""Moving model weights between torch modules and numpy arrays for the wire."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def state_to_numpy(
    model: nn.Module, *, exclude: set[str] | None = None
) -> dict[str, np.ndarray]:
    """Copy a model's state dict to numpy, leaving out the names in exclude."""
    exclude = exclude or set()
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in model.state_dict().items()
        if name not in exclude
    }


def load_numpy_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load (part of) a state dict from numpy arrays, keeping dtypes."""
    current = model.state_dict()
    update = {
        name: torch.from_numpy(np.array(value, copy=True)).to(current[name].dtype)
        for name, value in arrays.items()
    }
    model.load_state_dict(update, strict=False)
