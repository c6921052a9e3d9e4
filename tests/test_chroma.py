"""Chroma features (musicgen/chroma.py) equal transformers' MusicgenMelodyFeatureExtractor's exactly."""

from pathlib import Path

import numpy as np
import pytest
import soxr
from reference import melody_test_signal

from musicgen.chroma import chroma_features, chroma_filter_bank

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"


@pytest.fixture(scope="module")
def expected():
    return np.load(EXPECTED / "melody.npz")


@pytest.fixture(scope="module")
def signal():
    return melody_test_signal()


def test_filter_bank_matches_transformers(expected):
    bank = chroma_filter_bank(32000, 16384, 12)
    assert bank.shape == (12, 8193) and bank.dtype == np.float32
    np.testing.assert_allclose(bank[:, ::64], expected["filter_bank_rows"], rtol=1e-6, atol=1e-10)
    assert chroma_filter_bank(32000, 16384, 12) is bank  # computed once


@pytest.mark.parametrize(
    "key, clip",
    [
        ("chroma", lambda s: s),
        ("chroma_short", lambda s: s[:10000]),  # shorter than n_fft: zero-padded, centred
        ("chroma_batch", lambda s: [s, s[:64000]]),  # zero-padded to the longest
    ],
)
def test_chroma_matches_transformers(expected, signal, key, clip):
    ours = chroma_features(clip(signal), 32000)
    assert ours.dtype == np.float32 and ours.shape == expected[key].shape
    np.testing.assert_array_equal(ours, expected[key])


def test_chroma_is_one_hot_on_the_notes(signal):
    chroma = chroma_features(signal, 32000)[0]
    assert (chroma.sum(-1) == 1).all() and set(np.unique(chroma)) == {0.0, 1.0}
    # 32 frames of 128 ms: C, E, G, C for 8 frames each (C = 0, E = 4, G = 7)
    assert chroma.argmax(-1).tolist() == [0] * 8 + [4] * 8 + [7] * 8 + [0] * 8


@pytest.mark.parametrize("samples", [1, 4095, 16383, 16384, 16385, 50001, 128000])
def test_frames(samples):
    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    expected_frames = 1 + max(samples, 16384) // 4096
    assert chroma_features(audio, 32000).shape == (1, expected_frames, 12)


def test_truncated_to_30_seconds(signal):
    long = np.tile(signal, 9)  # 36 s
    chroma = chroma_features(long, 32000)
    assert chroma.shape == (1, 235, 12)
    np.testing.assert_array_equal(chroma, chroma_features(long[: 30 * 32000], 32000))
    assert chroma_features(long, 32000, max_seconds=4.0).shape == (1, 32, 12)


def test_channels_are_mixed_to_mono(signal):
    stereo = np.stack(
        [signal, signal], axis=1
    )  # the mean of two equal channels is the signal exactly
    np.testing.assert_array_equal(chroma_features(stereo, 32000), chroma_features(signal, 32000))
    batch = chroma_features([stereo, signal[:64000, None]], 32000)
    np.testing.assert_array_equal(batch, chroma_features([signal, signal[:64000]], 32000))


def test_resampled_stereo_agrees(expected):
    # The melody at 44.1 kHz, stereo (right at half level): soxr brings it to 32 kHz before the spectrogram.
    at_44k = melody_test_signal(44100)
    stereo = np.stack([at_44k, 0.5 * at_44k], axis=1)
    chroma = chroma_features(stereo, 44100)
    frames = 1 + len(soxr.resample(at_44k, 44100, 32000, quality="HQ")) // 4096
    assert chroma.shape == (1, frames, 12) == expected["chroma"].shape
    # measured: 32 of 32 frames agree with the 32 kHz chroma (soxr 1.0); 0.9 leaves room for other resamplers
    agree = (chroma.argmax(-1) == expected["chroma"].argmax(-1)).mean()
    assert agree >= 0.9, agree


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros(0, np.float32), 32000, "audio is empty"),
        (np.zeros((0, 2), np.float32), 32000, "audio is empty"),
        ([], 32000, "empty batch"),
        (
            np.zeros((1, 100, 2), np.float32),
            32000,
            r"expected \(samples,\) or \(samples, channels\)",
        ),
        (np.float32(0.5), 32000, r"expected \(samples,\) or \(samples, channels\)"),
        (np.zeros((2, 32000), np.float32), 32000, "more channels than samples"),
        (np.zeros(32000, np.float32), 0, "sampling rates must be positive"),
        (np.zeros(32000, np.float32), -44100, "sampling rates must be positive"),
    ],
)
def test_bad_input(audio, rate, message):
    with pytest.raises(ValueError, match=message):
        chroma_features(audio, rate)


def test_bad_max_seconds():
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        chroma_features(np.zeros(32000, np.float32), 32000, max_seconds=0)
