"""EnCodec audio codec in MLX."""

from encodec.encodec import EncodecConfig, EncodecModel

__all__ = ["EncodecConfig", "EncodecModel"]
