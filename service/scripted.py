"""Loading the package stage's TorchScript model (model.pt) for inference."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from service import SCRIPTED_MODEL_FILE


def load_scripted(folder: Path, image_size: int) -> torch.jit.ScriptModule:
    """model.pt of a packaged model folder, in eval mode and warmed up.

    The warm-up pass means the first request is not the slow one and /readyz means ready.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        module = torch.jit.load(str(folder / SCRIPTED_MODEL_FILE), map_location="cpu")
    module.eval()
    with torch.inference_mode():
        module(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    return module
