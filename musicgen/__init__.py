"""MusicGen text-to-music in MLX."""

from musicgen._blas import load_blas

load_blas()  # before anything imports mlx

__all__ = ["MusicGen", "save_audio", "load_audio", "normalize"]


def __getattr__(name: str):
    """Import the public API lazily, so that `import musicgen` alone stays light."""
    if name == "MusicGen":
        from musicgen.musicgen import MusicGen

        return MusicGen
    if name in ("save_audio", "load_audio", "normalize"):
        from musicgen import audio

        return getattr(audio, name)
    raise AttributeError(f"module 'musicgen' has no attribute {name!r}")
