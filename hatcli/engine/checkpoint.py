"""Checkpoints: written atomically, read without running code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from hatcli.atomic import atomic_write_bytes
from hatcli.errors import ArtifactError


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save a checkpoint dict (tensors and plain values only) atomically."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; one carrying pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactError(
            f"refusing to load {path}: it holds pickled code, not only weights ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise ArtifactError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
