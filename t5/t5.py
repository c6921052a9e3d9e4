"""T5 encoder (the MusicGen text encoder) in MLX: transformers' T5EncoderModel."""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


@dataclass
class T5Config:
    d_model: int = 768
    d_kv: int = 64
    num_heads: int = 12
    d_ff: int = 3072
    num_layers: int = 12
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_dict(cls, params: dict) -> T5Config:
        """Config from a Hugging Face T5 config dict (unknown keys ignored)."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Activation name as transformers resolves it ("gated-gelu" uses the tanh GELU)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "silu": nn.silu,
    "swish": nn.silu,
}


def relative_position_bucket(
    relative_position: mx.array, num_buckets: int = 32, max_distance: int = 128
) -> mx.array:
    """Bidirectional T5 bucket of each (key - query) offset: exact near 0, log-spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    distance = mx.abs(relative_position).astype(mx.int32)
    max_exact = num_buckets // 2
    scaled = mx.log(mx.maximum(distance, 1).astype(mx.float32) / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = mx.minimum(max_exact + scaled.astype(mx.int32), num_buckets - 1)
    return buckets + mx.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without query scaling (T5 folds 1/sqrt(d) into its weights)."""

    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class T5FeedForward(nn.Module):
    """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) for the gated variants."""

    def __init__(self, config: T5Config):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {config.feed_forward_proj!r}")
        self.act = _ACTIVATIONS[config.activation]
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attention = T5Attention(config)
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.attention(self.attention_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


# Hugging Face encoder names -> ours (after the "encoder." prefix is removed).
_RENAMES = [
    (r"^block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.", "relative_attention_bias."),
    (r"^block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"layers.\1.attention.\2."),
    (r"^block\.(\d+)\.layer\.0\.layer_norm\.", r"layers.\1.attention_norm."),
    (r"^block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.", r"layers.\1.ffn.\2."),
    (r"^block\.(\d+)\.layer\.1\.layer_norm\.", r"layers.\1.ffn_norm."),
    (r"^final_layer_norm\.", "final_norm."),
    (r"^embed_tokens\.", "embed_tokens."),
]


class T5Encoder(nn.Module):
    """Token ids -> final hidden states (batch, length, d_model) of the T5 encoder stack."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_heads
        )
        self.layers = [T5Block(config) for _ in range(config.num_layers)]
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """Relative position bias (1, heads, length, length), shared by every layer."""
        positions = mx.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        x = self.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1]).astype(x.dtype)
        if attention_mask is not None:
            masked = (1 - attention_mask.astype(x.dtype)) * mx.finfo(x.dtype).min
            bias = bias + masked[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face T5 names (composite prefix removed) -> ours; decoder and heads dropped."""
        out = {}
        for name, value in weights.items():
            if name == "shared.weight":
                out.setdefault("embed_tokens.weight", value)
                continue
            if not name.startswith("encoder."):
                continue
            name = name[len("encoder.") :]
            for pattern, repl in _RENAMES:
                new, n = re.subn(pattern, repl, name)
                if n:
                    out[new] = value
                    break
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: mx.Dtype = mx.float32) -> T5Encoder:
        """Load from a MusicGen composite folder (its text encoder) or a standalone T5 folder."""
        from musicgen.weights import DECODER_MODEL_TYPES, load_state_dict

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        weights = load_state_dict(path)
        if config.get("model_type") in DECODER_MODEL_TYPES:  # a composite MusicGen folder
            config = config["text_encoder"]
            prefix = "text_encoder."
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        model = cls(T5Config.from_dict(config))
        weights = {k: v.astype(dtype) for k, v in cls.sanitize(weights).items()}
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        mx.eval(model.parameters())
        return model
