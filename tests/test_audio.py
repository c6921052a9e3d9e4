"""musicgen.audio.normalize: audiocraft's leveling strategies, with BS.1770 loudness (pyloudnorm)."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest

import musicgen  # noqa: F401  (loads the BLAS before mlx)
from musicgen import normalize
from musicgen.audio import NORMALIZE_STRATEGIES

RATE = 32_000


def music_like(seconds: float = 3.0, channels: int = 2, level: float = 0.3) -> np.ndarray:
    """Decaying notes over noise: peaks, quiet stretches and different channels, like generated music."""
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * RATE)) / RATE
    notes = (
        np.sin(2 * np.pi * 220 * t[:, None] * np.arange(1, channels + 1))
        * np.exp(-3 * (t % 0.5))[:, None]
    )
    return (level * notes + 0.02 * rng.standard_normal((t.size, channels))).astype(np.float32)


def test_peak_puts_the_loudest_sample_at_minus_1_dbfs():
    out = np.asarray(normalize(music_like(), RATE, "peak"))
    assert np.abs(out).max() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    out = np.asarray(normalize(music_like(), RATE, "peak", peak_headroom_db=6))
    assert np.abs(out).max() == pytest.approx(10 ** (-6 / 20), rel=1e-6)


def test_rms_levels_the_mono_mix():
    out = np.asarray(normalize(music_like(), RATE, "rms"), dtype=np.float64)
    assert np.sqrt(np.mean(out.mean(axis=1) ** 2)) == pytest.approx(10 ** (-18 / 20), rel=1e-5)


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_loudness_reaches_the_target(target):
    clip = music_like()
    out = np.asarray(normalize(clip, RATE, "loudness", loudness_db=target, compress=False))
    assert pyloudnorm.Meter(RATE).integrated_loudness(out.astype(np.float64)) == pytest.approx(
        target, abs=1e-3
    )
    # a pure gain: the waveform's shape is kept
    gain = out[:, 0] @ clip[:, 0] / (clip[:, 0] @ clip[:, 0])
    np.testing.assert_allclose(out, gain * clip, rtol=1e-5, atol=1e-7)


def test_loudness_of_a_sine_follows_bs1770():
    """BS.1770: a 997 Hz sine at full scale in both channels measures about 0 LUFS (-0.04 with pyloudnorm's
    K-weighting at 48 kHz), so a sine of amplitude 0.1 (-20 dB) taken to -20 LUFS keeps about its level."""
    rate = 48_000
    t = np.arange(3 * rate) / rate
    sine = 0.1 * np.repeat(np.sin(2 * np.pi * 997 * t)[:, None], 2, axis=1)
    out = np.asarray(normalize(sine, rate, "loudness", loudness_db=-20, compress=False))
    assert 20 * np.log10(np.abs(out).max() / 0.1) == pytest.approx(0.04, abs=0.02)


def test_loudness_soft_clips_with_tanh():
    clip = music_like(level=0.9)
    plain = np.asarray(normalize(clip, RATE, "loudness", loudness_db=-5, compress=False))
    soft = np.asarray(normalize(clip, RATE, "loudness", loudness_db=-5))
    assert np.abs(plain).max() > 1 > np.abs(soft).max()
    np.testing.assert_allclose(soft, np.tanh(plain.astype(np.float64)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "clip",
    [
        np.full((RATE, 1), 1e-3, np.float32),  # near silence: RMS below 2e-3
        music_like(seconds=0.3),  # shorter than one 400 ms loudness block
    ],
    ids=["near silence", "shorter than a block"],
)
def test_loudness_leaves_what_it_cannot_measure(clip):
    np.testing.assert_array_equal(np.asarray(normalize(clip, RATE, "loudness")), clip)


def test_none_and_shapes():
    mono = music_like(channels=1)[:, 0]
    np.testing.assert_array_equal(np.asarray(normalize(mono, RATE, "none")), mono[:, None])
    assert normalize(np.zeros((RATE, 2)), RATE, "peak").shape == (
        RATE,
        2,
    )  # silence: no division by 0
    assert set(NORMALIZE_STRATEGIES) == {"none", "peak", "rms", "loudness"}
    with pytest.raises(ValueError, match="unknown normalize strategy 'loud'"):
        normalize(mono, RATE, "loud")


def test_cli_offers_the_same_strategies():
    from apps import musicgen_cli

    assert musicgen_cli.NORMALIZE_STRATEGIES == NORMALIZE_STRATEGIES
