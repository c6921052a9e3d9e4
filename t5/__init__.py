"""T5 text encoder and tokenizer in MLX."""

from t5.t5 import T5Config, T5Encoder, relative_position_bucket
from t5.tokenizer import T5Tokenizer

__all__ = ["T5Config", "T5Encoder", "T5Tokenizer", "relative_position_bucket"]
