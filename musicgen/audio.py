"""Audio files: save (atomic), load, and resample (soxr)."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import soundfile as sf
import soxr

FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
# libvorbis crashes the process (SIGSEGV) above about 200 kHz; 192 kHz is the highest usual rate below it.
MAX_RATES = {".ogg": 192_000}


def check_rate(ext: str, sampling_rate: int) -> None:
    """ValueError if files of extension `ext` cannot hold `sampling_rate`."""
    limit = MAX_RATES.get(ext.lower())
    if limit is not None and sampling_rate > limit:
        raise ValueError(f"{ext} files take sample rates up to {limit} Hz, got {sampling_rate}")


def _to_numpy(audio) -> np.ndarray:
    """(samples,), (samples, channels) or (1, samples, channels) -> float32 (samples, channels)."""
    a = np.asarray(
        audio.astype(mx.float32) if isinstance(audio, mx.array) else audio, dtype=np.float32
    )
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise ValueError(f"save one clip at a time, got a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"expected (samples, channels) audio, got shape {a.shape}")
    return a


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it: racy with threads making files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_audio(path: str | Path, audio, sampling_rate: int, *, subtype: str | None = None) -> Path:
    """Write audio (samples, channels) to .wav/.flac/.ogg atomically (temp file in the same folder + rename).

    Samples are clipped to [-1, 1]; wav/flac are 16-bit PCM unless `subtype` says otherwise (e.g. "FLOAT").
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"unsupported audio format {path.suffix!r}: use one of {sorted(FORMATS)}")
    fmt, default_subtype = FORMATS[ext]
    check_rate(ext, int(sampling_rate))
    data = np.clip(_to_numpy(audio), -1.0, 1.0)
    # Encoded in memory first: libsndfile writing a file itself reports a full disk as an empty error
    # (or not at all, for Ogg), and through a Python file it prints the OSError's traceback.
    encoded = io.BytesIO()
    sf.write(encoded, data, int(sampling_rate), format=fmt, subtype=subtype or default_subtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded.getbuffer())
        # mkstemp files are private; the finished file gets the usual mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


NORMALIZE_STRATEGIES = ("none", "peak", "rms", "loudness")


def _decibels(db: float) -> float:
    return 10.0 ** (db / 20.0)


def normalize(
    audio,
    sampling_rate: int,
    strategy: str = "loudness",
    *,
    peak_headroom_db: float = 1.0,
    rms_headroom_db: float = 18.0,
    loudness_db: float = -14.0,
    compress: bool = True,
) -> mx.array:
    """Level one clip (samples, channels) as audiocraft's `audio_write` strategies do.

    - "none": unchanged (saving clips it to [-1, 1]);
    - "peak": the loudest sample at -`peak_headroom_db` dBFS;
    - "rms": the mono mix's RMS at -`rms_headroom_db` dBFS (then clipped when saved);
    - "loudness": `loudness_db` LUFS integrated loudness (ITU-R BS.1770-4, pyloudnorm), then a tanh
      soft clip when `compress` (audiocraft's `loudness_compressor`). Near-silent clips (RMS below
      2e-3) and clips shorter than the 0.4 s loudness block stay unchanged.
    """
    if strategy not in NORMALIZE_STRATEGIES:
        raise ValueError(
            f"unknown normalize strategy {strategy!r}: use one of {NORMALIZE_STRATEGIES}"
        )
    a = _to_numpy(audio).astype(np.float64)
    if strategy == "peak":
        peak = np.abs(a).max(initial=0.0)
        if peak > 0:
            a *= _decibels(-peak_headroom_db) / peak
    elif strategy == "rms":
        rms = np.sqrt(np.mean(a.mean(axis=1) ** 2)) if a.size else 0.0
        if rms > 0:
            a *= _decibels(-rms_headroom_db) / rms
    elif strategy == "loudness":
        a = _normalize_loudness(a, sampling_rate, loudness_db, compress)
    return mx.array(a.astype(np.float32))


def _normalize_loudness(a: np.ndarray, sampling_rate: int, target_db: float, compress: bool):
    import pyloudnorm

    block_s = 0.4
    if a.shape[0] < block_s * sampling_rate or np.sqrt(np.mean(a**2)) < 2e-3:
        return a
    loudness = pyloudnorm.Meter(sampling_rate, block_size=block_s).integrated_loudness(a)
    if not np.isfinite(loudness):  # every block below the -70 LUFS gate
        return a
    a = a * _decibels(target_db - loudness)
    return np.tanh(a) if compress else a


def resample(audio, from_rate: int, to_rate: int) -> mx.array:
    """Resample float audio (samples, channels) with soxr (high quality)."""
    a = _to_numpy(audio)
    if from_rate != to_rate:
        a = soxr.resample(a, from_rate, to_rate, quality="HQ").astype(np.float32)
    return mx.array(a)


def load_audio(path: str | Path, sampling_rate: int | None = None) -> tuple[mx.array, int]:
    """Read an audio file as float32 (samples, channels) and its rate, resampled to `sampling_rate` if given."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if sampling_rate is not None and sampling_rate != rate:
        return resample(data, rate, sampling_rate), sampling_rate
    return mx.array(data), rate
