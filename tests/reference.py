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


def melody_test_signal(rate: int = 32000) -> np.ndarray:
    """scripts/make_reference_fixtures.py's 4 s melody (C4, E4, G4, C5), here at any sampling rate."""
    t = np.arange(rate, dtype=np.float64) / rate
    fade = np.minimum(1.0, np.minimum(t, 1.0 - t) / 0.02)
    notes = []
    for midi in (60, 64, 67, 72):
        f = 440.0 * 2.0 ** ((midi - 69) / 12)
        tone = sum(a * np.sin(2 * np.pi * h * f * t) for h, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
        notes.append(0.3 * fade * tone)
    return np.concatenate(notes).astype(np.float32)
