"""Chroma features for MusicGen melody conditioning, in numpy (no torch, no librosa).

Equal to transformers' `MusicgenMelodyFeatureExtractor` on raw audio: a power spectrogram (periodic Hann window
of n_fft samples, centred frames with reflect padding, normalised by the window's L2 norm, as torchaudio's
`Spectrogram(normalized=True)`), projected onto `num_chroma` pitch classes with librosa's chroma filter bank
(C first, tuning 0), normalised by each frame's maximum, then one-hot at the argmax. Audio is mixed to mono,
resampled to 32 kHz with soxr and cut to 30 s; a batch is zero-padded to its longest clip, and audio shorter
than n_fft is zero-padded (centred) to n_fft. With centred frames there are 1 + samples // hop_length of them.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import soxr


@cache
def chroma_filter_bank(sampling_rate: int, n_fft: int, num_chroma: int = 12) -> np.ndarray:
    """librosa's chroma filter bank (tuning 0, C first): (num_chroma, n_fft // 2 + 1) float32."""
    # pitch of each FFT bin in chroma bins above A0 (27.5 Hz); bin 0 (DC) gets one 1.5 octaves below bin 1
    hertz = np.arange(1, n_fft) * (sampling_rate / n_fft)
    pitch = num_chroma * np.log2(hertz / (440.0 / 16))
    pitch = np.concatenate([[pitch[0] - 1.5 * num_chroma], pitch])
    width = np.concatenate([np.maximum(np.diff(pitch), 1.0), [1.0]])
    # distance of each bin to each chroma class, wrapped into [-num_chroma / 2, num_chroma / 2)
    half = np.round(num_chroma / 2)
    distance = pitch[None, :] - np.arange(num_chroma, dtype=np.float64)[:, None]
    distance = np.remainder(distance + half + 10 * num_chroma, num_chroma) - half
    bank = np.exp(-0.5 * (2 * distance / width) ** 2)
    bank /= np.sqrt(np.sum(bank**2, axis=0, keepdims=True))
    # a Gaussian weighting over octaves, centred 5 octaves above A0 (880 Hz) with half-width 2
    bank *= np.exp(-0.5 * ((pitch / num_chroma - 5.0) / 2.0) ** 2)
    bank = np.roll(bank, -3 * (num_chroma // 12), axis=0)  # start at C, not A
    return np.ascontiguousarray(bank[:, : n_fft // 2 + 1], dtype=np.float32)


def power_spectrogram(audio: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """Power spectrogram (batch, frames, n_fft // 2 + 1) of (batch, samples) audio, as torchaudio's."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    padded = np.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop_length]
    spectrum = np.fft.rfft(frames * window, axis=-1) / np.sqrt(np.sum(window**2))
    return spectrum.real**2 + spectrum.imag**2


def _mono(clip, sampling_rate: int, target_rate: int, max_samples: int) -> np.ndarray:
    """One clip, (samples,) or (samples, channels), as mono float32 at target_rate, cut to max_samples."""
    a = np.asarray(clip, dtype=np.float32)
    if a.ndim not in (1, 2):
        raise ValueError(f"expected (samples,) or (samples, channels) audio, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"audio is empty (shape {a.shape})")
    if a.ndim == 2:
        if a.shape[1] > a.shape[0]:
            raise ValueError(
                f"expected (samples, channels) audio, got shape {a.shape}: more channels than samples "
                "(channels-first audio needs transposing)"
            )
        a = a.mean(axis=1)
    if sampling_rate != target_rate:
        a = soxr.resample(a, sampling_rate, target_rate, quality="HQ").astype(np.float32)
    return a[:max_samples]


def chroma_features(
    audio,
    sampling_rate: int,
    *,
    n_fft: int = 16384,
    hop_length: int = 4096,
    num_chroma: int = 12,
    target_rate: int = 32000,
    max_seconds: float = 30.0,
) -> np.ndarray:
    """One-hot chroma (batch, frames, num_chroma) float32 of a clip or a list of clips (a batch)."""
    if sampling_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {sampling_rate} and {target_rate}")
    clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    if not clips:
        raise ValueError("no audio: got an empty batch")
    max_samples = int(round(max_seconds * target_rate))
    if max_samples <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    clips = [_mono(c, sampling_rate, target_rate, max_samples) for c in clips]

    # zero-pad to the longest clip, then (centred) to n_fft if shorter
    length = max(len(c) for c in clips)
    batch = np.zeros((len(clips), max(length, n_fft)), dtype=np.float32)
    start = max(n_fft - length, 0) // 2
    for i, c in enumerate(clips):
        batch[i, start : start + len(c)] = c

    spec = power_spectrogram(batch.astype(np.float64), n_fft, hop_length)
    raw = spec @ chroma_filter_bank(target_rate, n_fft, num_chroma).T.astype(np.float64)
    norm = raw / np.maximum(raw.max(axis=-1, keepdims=True), 1e-6)
    one_hot = np.zeros(norm.shape, dtype=np.float32)
    np.put_along_axis(one_hot, norm.argmax(axis=-1)[..., None], 1.0, axis=-1)
    return one_hot
