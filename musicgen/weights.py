"""Reading Hugging Face checkpoints into MLX arrays (first version: safetensors only; extended by the weights work)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx


def load_state_dict(folder: str | Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder, with their Hugging Face names."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, mx.array] = {}
    for name in files:
        weights.update(mx.load(str(folder / name)))
    return weights
