"""Reading whole DCP checkpoints in tests, without a model to load them into."""

import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def checkpoint_tensors(uri: str) -> dict:
    """Every tensor of a local DCP checkpoint, unsharded: {"model": {...}, "optimizer": {...}}."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "full.pt"
        dcp_to_torch_save(uri.removeprefix("file://"), target)
        return torch.load(target, weights_only=True)
