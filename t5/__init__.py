"""T5 text encoder and tokenizer in MLX."""

from musicgen._blas import load_blas

load_blas()  # OpenBLAS before anything imports mlx (no-op on macOS, or when turned off)

from t5.t5 import T5Config, T5Encoder, relative_position_bucket  # noqa: E402
from t5.tokenizer import T5Tokenizer  # noqa: E402

__all__ = ["T5Config", "T5Encoder", "T5Tokenizer", "relative_position_bucket"]
