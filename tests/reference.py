"""Helpers shared by tests that read the transformers reference outputs in tests/fixtures/expected."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

EXPECTED = Path(__file__).parent / "fixtures" / "expected"


def text_states(indices, attention_mask) -> tuple[mx.array, mx.array]:
    """Reference T5 states of PROMPTS[i] (alone), right-padded to the width of attention_mask."""
    t5 = np.load(EXPECTED / "t5.npz")
    states = np.zeros((len(indices), attention_mask.shape[1], t5["hidden_0"].shape[-1]), np.float32)
    for row, i in enumerate(indices):
        h = t5[f"hidden_{i}"][0]
        states[row, : h.shape[0]] = h
    return mx.array(states), mx.array(attention_mask)
