"""MusicGen text-to-music in MLX."""

from musicgen._blas import load_blas

load_blas()  # before anything imports mlx
