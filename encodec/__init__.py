"""EnCodec audio codec in MLX."""

from musicgen._blas import load_blas

load_blas()  # OpenBLAS before anything imports mlx (no-op on macOS, or when turned off)

from encodec.encodec import EncodecConfig, EncodecModel  # noqa: E402

__all__ = ["EncodecConfig", "EncodecModel"]
