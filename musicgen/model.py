"""The MusicGen decoder (transformers' MusicgenForCausalLM plus `enc_to_dec_proj`) with a preallocated KV cache.

The same module is MusicGen-Melody's decoder (MusicgenMelodyForCausalLM plus both projections): its
layers have no cross-attention, and the conditioning (the melody's chroma, then the text) is a prefix
of the decoder's own sequence (`conditioning_prefix`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from encodec.encodec import cpu_streams, product_in_pieces, row_pieces
from musicgen import _blas, cpu_kernels


@dataclass
class MusicgenDecoderConfig:
    """Hyper-parameters of the decoder (the `decoder` sub-config of a MusicGen config.json)."""

    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    num_hidden_layers: int = 24
    ffn_dim: int = 4096
    num_attention_heads: int = 16
    hidden_size: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = (
        False  # kept for compatibility; transformers never applies it, nor do we
    )
    num_codebooks: int = 4
    audio_channels: int = 1
    pad_token_id: int = 2048
    bos_token_id: int = 2048
    cross_attention_hidden_size: int | None = None
    encoder_hidden_size: int | None = (
        None  # width of the text encoder's states (composite config only)
    )
    #: False for MusicGen-Melody: no cross-attention, the conditioning is prefixed to the sequence
    cross_attention: bool = True
    num_chroma: int | None = None  # Melody: chroma bins of the melody conditioning (12)
    chroma_length: int | None = None  # Melody: chroma frames of the prefix (235, i.e. 30 s)

    @classmethod
    def from_dict(cls, d: dict) -> MusicgenDecoderConfig:
        """Build from a decoder sub-config, or from a whole MusicGen config (reads the T5 width too)."""
        if "decoder" in d and isinstance(d["decoder"], dict):
            text = d.get("text_encoder") or {}
            sub = dict(d["decoder"])
            sub.setdefault("encoder_hidden_size", text.get("d_model", text.get("hidden_size")))
            if d.get("model_type") == "musicgen_melody":
                sub.update(
                    num_chroma=d.get("num_chroma", 12), chroma_length=d.get("chroma_length", 235)
                )
            d = sub
        if d.get("model_type") == "musicgen_melody_decoder":
            d = {**d, "cross_attention": False}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def has_enc_to_dec_proj(self) -> bool:
        """True when transformers projects the text states (widths differ, no cross_attention_hidden_size)."""
        return (
            self.encoder_hidden_size is not None
            and self.encoder_hidden_size != self.hidden_size
            and self.cross_attention_hidden_size is None
        )

    @property
    def max_steps(self) -> int:
        """The decoder positions a generation may use for audio (Melody: those the chroma leaves;
        the text's positions come off this too)."""
        return self.max_position_embeddings - (self.chroma_length or 0)

    @property
    def has_chroma_proj(self) -> bool:
        """True for Melody when transformers projects the chroma (num_chroma != width)."""
        return self.num_chroma is not None and self.num_chroma != self.hidden_size

    @property
    def delays(self) -> list[int]:
        """Per-codebook delays: q for codebook q (mono); stereo interleaves L/R as 0, 0, 1, 1, ..."""
        if self.audio_channels == 2:
            return [q for q in range(self.num_codebooks // 2) for _ in range(2)]
        return list(range(self.num_codebooks))


def sinusoidal_positions(num_positions: int, dim: int) -> mx.array:
    """transformers' MusicGen positions: cat(cos, sin) of pos * exp(-i * log(1e4) / (dim/2 - 1)), fp32 math."""
    half = dim // 2
    step = np.float32(math.log(10000) / (half - 1))
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(
        np.float32
    )
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freqs[None, :]
    table = np.concatenate(
        [np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))], axis=1
    )
    if dim % 2 == 1:
        table = np.concatenate([table, np.zeros((num_positions, 1))], axis=1)
    return mx.array(table.astype(np.float32))


class KVCache:
    """Self-attention keys/values of one layer, preallocated to (batch, heads, max_len, head_dim)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, heads, max_len, head_dim), dtype)
        self.values = mx.zeros((batch, heads, max_len, head_dim), dtype)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def update(
        self, keys: mx.array, values: mx.array, offset: int | mx.array
    ) -> tuple[mx.array, mx.array]:
        """Write keys/values at `offset` in place.

        An int offset returns views of the filled part (positions < offset + len); an int32 array of
        shape (1,) returns the full buffers (the caller masks the unfilled positions).
        """
        if isinstance(offset, int):
            end = offset + keys.shape[2]
            self.keys[:, :, offset:end] = keys.astype(self.keys.dtype)
            self.values[:, :, offset:end] = values.astype(self.values.dtype)
            return self.keys[:, :, :end], self.values[:, :, :end]
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), offset, axes=(2,))
        self.values = mx.slice_update(
            self.values, values.astype(self.values.dtype), offset, axes=(2,)
        )
        return self.keys, self.values


@dataclass
class CrossState:
    """Cross-attention keys/values of every layer and the encoder mask, computed once per generation."""

    kv: list[tuple[mx.array, mx.array]]
    mask: mx.array | None  # bool (batch, 1, 1, src_len), True = attend
    has_text: mx.array | None = None  # bool (batch,): False for rows whose mask was all zeros


def linear(
    p: dict,
    x: mx.array,
    quantization: tuple[int, int] | None = None,
    weight_first: bool = False,
    side: mx.Stream | None = None,
    product=None,
    quantized_product=None,
) -> mx.array:
    """x (rows, in) through a linear layer's parameters `p` -> (rows, out).

    Float weights run as x @ W^T, or with `weight_first` as W @ x^T: for a few rows that is the
    matrix-vector form OpenBLAS streams fastest (5-20 % faster at 2 rows), as does MKL on an AMD CPU,
    while MKL on an Intel CPU streams x @ W^T twice as fast as W @ x^T (see `_blas.weight_first`).
    With `p["pieces"]` (W's rows cut by `in_pieces`), x @ W^T runs piece by piece, which the BLAS
    takes its faster small-matrix path for (`_blas.small_product_limit`), and with `side` every other
    piece on that stream: the small-matrix code runs on one thread, so the second core takes half.
    With `product` (the CPU kernels' `few_row_product`), float weights run as product(x, W), and with
    `quantized_product` (theirs for 8- and 4-bit groups of 64) quantized weights.
    """
    if "scales" in p:
        group_size, bits = quantization
        if quantized_product is not None:
            y = quantized_product(x, p["weight"], p["scales"], p["biases"], bits)
        else:
            y = mx.quantized_matmul(
                x, p["weight"], p["scales"], p["biases"], True, group_size=group_size, bits=bits
            )
    elif product is not None:
        y = product(x, p["weight"])
    elif weight_first:
        y = (p["weight"] @ x.T).T
    elif "pieces" in p:
        y = product_in_pieces(x, p["pieces"], side)
    else:
        y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


def in_pieces(tree, rows: int, limit: int):
    """`tree` with each float linear layer's weight (2-D) replaced by its `row_pieces` for `rows` rows.

    Cut once when a step is built, not inside every step: as slices made in the step, the pieces cost
    the step two view operations each (about 1500 a step for musicgen-small).
    """
    if isinstance(tree, list):
        return [in_pieces(t, rows, limit) for t in tree]
    if not isinstance(tree, dict):
        return tree
    w = tree.get("weight")
    if w is None or w.ndim != 2 or "scales" in tree:
        return {k: in_pieces(v, rows, limit) for k, v in tree.items()}
    if w.size * rows <= limit:
        return tree
    rest = {k: v for k, v in tree.items() if k != "weight"}
    return {**rest, "pieces": row_pieces(w, rows, limit)}


def layer_norm(p: dict, x: mx.array, kernel=None) -> mx.array:
    """MusicGen's layer norm (eps 1e-5); `kernel`: the CPU kernels' `layer_norm` instead."""
    if kernel is not None:
        return kernel(x, p["weight"], p["bias"], 1e-5)
    return mx.fast.layer_norm(x, p["weight"], p["bias"], 1e-5)


# Keys per matrix-vector product of the attention scores on the CPU. OpenBLAS 0.3.21 runs q K^T
# for one head at about 2x the time per key once a head holds more than ~1200 keys (measured: 24
# layers at 1450 positions, 65 ms in one product per head vs 29 ms in chunks of 1024).
SCORE_CHUNK = 1024


# From this many keys, the CPU step with MKL computes the self-attention's softmax with
# `exp_nonpositive` (below it, the extra ops cost about what the faster exp saves: 24 layers' attention
# at 100 keys 7.2 ms either way, at 200 10.4 -> 9.4 ms, at 300 10.0 -> 9.1 ms).
FAST_EXP_FROM = 256

# Cephes expf: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two parts).
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)


# Adding and subtracting 1.5 * 2^23 rounds a float32 of magnitude below 2^22 to an integer.
_ROUND = 12582912.0


@partial(mx.compile, shapeless=True)
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    x = mx.where(x < -87.0, -87.0, x)  # exp(-87) is about the smallest normal float32
    n = (x * _LOG2E + _ROUND) - _ROUND  # no `floor`: a libm call that keeps g++ from vectorizing
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in (*_EXP_POLY[1:], 5.0000001201e-1):
        p = p * r + c
    return p * r * r + r + 1.0, mx.left_shift(n.astype(mx.int32) + 127, 23)


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (below -87: exp(-87)), within 1e-7 relative.

    MLX's CPU `exp` calls `fmaf` out of line (its wheel is built without FMA): 12-16 ns per element,
    and 3.6e-6 relative error. This polynomial, compiled by MLX's CPU JIT (g++ -O3), takes 2.0-2.4 ns
    on the attention's arrays (4.5 ns with `floor` for the rounding); 2^n is built from its bits.
    """
    p, bits = _exp_parts(x)
    return p * bits.view(mx.float32)


def single_query_attention(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float = 1.0,
    chunk: int | None = None,
    fast_exp: bool = False,
) -> mx.array:
    """Attention of one query per head (batch, heads, 1, d) over keys/values (batch, heads, len, d).

    softmax(q K^T) V as two matrix-vector products per head, which the CPU BLAS runs at memory bandwidth
    (the generic scaled_dot_product_attention is slower on a long cache). With `chunk`, the scores
    are computed `chunk` keys at a time; with `fast_exp`, the softmax uses `exp_nonpositive` and
    divides the output by the weights' sum (d values instead of len).
    """
    if scale != 1.0:
        q = q * scale
    length = keys.shape[2]
    if chunk is None or length <= chunk:
        scores = q @ keys.swapaxes(-1, -2)
    else:
        parts = [keys[:, :, i : i + chunk] for i in range(0, length, chunk)]
        scores = mx.concatenate([q @ k.swapaxes(-1, -2) for k in parts], axis=-1)
    if fast_exp:
        scores = scores.astype(mx.float32)
        e = exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))
        out = e.astype(values.dtype) @ values
        return (out / e.sum(axis=-1, keepdims=True)).astype(values.dtype)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return weights.astype(values.dtype) @ values


class Attention(nn.Module):
    """Multi-head attention without biases (self- or cross-attention)."""

    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def _split(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

    def key_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values of `x` as (batch, heads, len, head_dim)."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def attend(self, x: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        """Attention of the queries of `x` over the given keys/values."""
        b, n, _ = x.shape
        q = self._split(self.q_proj(x))
        if n == 1 and mask is None:
            out = single_query_attention(q, keys, values, self.scale)
        else:
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))

    def __call__(
        self, x: mx.array, mask, cache: KVCache | None = None, offset: mx.array | None = None
    ):
        keys, values = self.key_values(x)
        if cache is not None:
            keys, values = cache.update(keys, values, offset)
        return self.attend(x, keys, values, mask)


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU with a rational float32 erf (Eigen's; within 2 ulp of erf).

    MLX's CPU erf is scalar (~23 ns per element): this fused form is ~6x faster, a few percent of a
    decoder step.
    """
    y = x.astype(mx.float32) * 0.7071067811865476
    y = mx.clip(y, -4.0, 4.0)
    y2 = y * y
    p = y2 * -2.72614225801306e-10 + 2.77068142495902e-08
    for c in (-2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04):
        p = p * y2 + c
    p = (p * y2 + -2.95459980854025e-03) * y2 + -1.60960333262415e-02
    q = y2 * -1.45660718464996e-05 + -2.13374055278905e-04
    for c in (-1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = q * y2 + c
    return (x * (1 + y * p / q) * 0.5).astype(x.dtype)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the text (not in Melody), GELU feed-forward."""

    def __init__(self, config: MusicgenDecoderConfig):
        super().__init__()
        dims = config.hidden_size
        self.self_attn = Attention(dims, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dims)
        if config.cross_attention:
            self.encoder_attn = Attention(dims, config.num_attention_heads)
            self.encoder_attn_layer_norm = nn.LayerNorm(dims)
        self.fc1 = nn.Linear(dims, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, dims, bias=False)
        self.final_layer_norm = nn.LayerNorm(dims)
        self.act = ACTIVATIONS[config.activation_function]

    def __call__(self, x, mask, cross_kv, cross_mask, cache=None, offset=None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, offset)
        if cross_kv is not None:
            x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), *cross_kv, cross_mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class TokenStep:
    """One decoder step for one new token per row (generation), with fixed-shape work compiled.

    Per layer: a compiled block (layer norm, Q/K/V projections), the in-place cache write and the
    attention over the filled cache (its length grows every step, so it stays uncompiled), and a
    compiled block for the rest (output projection, cross-attention, feed-forward). Parameters are
    gathered once, when the step is built for a generation, and with pieces (below) each linear
    weight is cut into them then too (`in_pieces`).

    Cross-attention runs for the leading rows that have text only: a row with an all-zero mask (the
    unconditional half of classifier-free guidance) attends to zero states, which gives exactly 0.
    With `fold_cross` (default: when it reads fewer bytes, i.e. rows x heads x text length < width)
    the query and output projections are folded into the text's keys and values once per
    generation (see `fold_cross_attention`), so a step reads two small per-row matrices instead
    of two width x width weights.

    On an x86-64 CPU with AVX-512 (float32, <= 8 rows, GELU), each layer runs as two fused CPU
    kernels around its cache write (`kernels`, see musicgen.cpu_kernels and `_fused_layers`), and
    the LM heads and final layer norm on the kernels' products (a quantized float32 decoder too, with
    the cross-attention folded; else its products alone, `quantized_product`): at ~100 / ~750 / ~1450 positions
    28.7-31.0 / 31.6-34.3 / 35.2-42.8 ms against 44.8-45.2 / 53.2-55.1 / 60.1-61.3 ms on MLX's
    operations (musicgen-small shape, back to back, 3 rounds). On MLX's operations with OpenBLAS's
    AVX-512 kernels, each product runs in small-matrix pieces, every other one on a second stream
    (`split_products`; see `linear`); with one stream the step took 53.7-53.8 / 61.4-61.6 /
    71.8-77.6 ms against 45.7-46.2 / 52.6-53.9 / 62.6-65.0 ms on two (an earlier run).
    """

    def __init__(
        self,
        decoder: MusicgenDecoder,
        cross: CrossState,
        cache: list[KVCache],
        fold_cross: bool | None = None,
        weight_first: bool | None = None,
        small_product: int | None = None,
        split_products: bool | None = None,
        kernels: bool | None = None,
    ):
        c = decoder.config
        heads, dims = c.num_attention_heads, c.hidden_size
        head_dim = dims // heads
        scale = head_dim**-0.5
        act = ACTIVATIONS[c.activation_function]
        quant = (
            None if decoder.quant_bits is None else (decoder.quant_group_size, decoder.quant_bits)
        )
        rows = cache[0].keys.shape[0]
        on_cpu = mx.default_device() == mx.cpu
        bits = _fused_bits(decoder)  # None: quantized in part, which the fused layers do not take
        fits_kernels = (
            on_cpu
            and rows <= cpu_kernels.MAX_ROWS
            and c.activation_function == "gelu"
            and decoder.dtype == mx.float32
            and cache[0].keys.dtype in (mx.float32, mx.float16)
            # quantized: 8 or 4 bits in groups of 64, with the cross-attention folded
            and (bits == 0 or (bits in (4, 8) and quant[0] == 64 and fold_cross is not False))
        )
        self.kernels = cpu_kernels.load() if fits_kernels and kernels is not False else None
        if kernels and self.kernels is None:
            raise ValueError(
                f"the CPU kernels need a float32 CPU step of <= {cpu_kernels.MAX_ROWS} rows with "
                "GELU (quantized: 8 or 4 bits in groups of 64, the cross-attention folded)"
            )
        self.bits = bits or 0
        if self.kernels is not None:
            weight_first, small_product, split_products = False, 0, False
            fold_cross = True if self.bits else fold_cross
        if weight_first is None:
            weight_first = on_cpu and _blas.weight_first()  # a BLAS choice: CPU only
        if small_product is None and on_cpu:
            small_product = _blas.small_product_limit()
        self._side = _side_stream()  # the second stream, None on a GPU or with MKL
        if split_products is None:
            split_products = self._side is not None
        side = cpu_streams()[0] if split_products and small_product and on_cpu else None
        product = self.kernels.few_row_product if self.kernels is not None else None
        # a quantized decoder's products on the kernels (float32 scales, groups of 64)
        quantized = None
        fits_quantized = on_cpu and quant is not None and quant[0] == 64 and kernels is not False
        if fits_quantized and decoder.dtype == mx.float32 and rows <= cpu_kernels.MAX_ROWS:
            loaded = cpu_kernels.load()
            quantized = loaded and loaded.quantized_product
        lin = partial(
            linear,
            quantization=quant,
            weight_first=weight_first,
            side=side,
            product=product,
            quantized_product=quantized,
        )
        norm = partial(layer_norm, kernel=self.kernels and self.kernels.layer_norm)
        text_rows = rows if cross.has_text is None else _leading_true(cross.has_text.tolist())
        text_rows = text_rows if cross.kv else 0  # Melody: no cross-attention
        text_len = cross.kv[0][0].shape[2] if cross.kv else 0
        if fold_cross is None and text_rows:
            e = decoder.layers[0].encoder_attn
            weights = _nbytes([e.q_proj.parameters(), e.out_proj.parameters()])
            fold_cross = text_rows * heads * text_len < weights / (2 * dims * decoder.dtype.size)
        self.text_rows, self.fold_cross = text_rows, fold_cross and text_rows > 0
        #: whether the step runs on the CPU kernels (the fused layers, or a quantized decoder's products)
        self.on_kernels = self.kernels is not None or quantized is not None

        def attention_in(p: dict, x: mx.array):
            h = norm(p["self_attn_layer_norm"], x)
            a = p["self_attn"]

            def split(y):
                return y.reshape(rows, heads, 1, head_dim)

            q = split(lin(a["q_proj"], h) * scale)
            return q, split(lin(a["k_proj"], h)), split(lin(a["v_proj"], h))

        def cross_attention(e: dict, h: mx.array, keys, values, mask) -> mx.array:
            q = lin(e["q_proj"], h).reshape(text_rows, heads, 1, head_dim) * scale
            scores = mx.where(mask, q @ keys.swapaxes(-1, -2), -mx.inf)
            attn = mx.softmax(scores, axis=-1, precise=True) @ values
            return lin(e["out_proj"], attn.reshape(text_rows, dims))

        def folded_cross_attention(e: dict, h: mx.array, to_scores, from_weights, mask):
            scores = (to_scores @ h[:, :, None]).reshape(text_rows, heads, text_len)
            scores = mx.where(mask, scores, -mx.inf)
            weights = mx.softmax(scores, axis=-1, precise=True).reshape(text_rows, -1, 1)
            return (from_weights @ weights).reshape(text_rows, dims)

        attend_text = folded_cross_attention if self.fold_cross else cross_attention

        def attention_out(p: dict, x, attn, *text):
            x = x + lin(p["self_attn"]["out_proj"], attn.reshape(rows, dims))
            if text_rows:
                h = norm(p["encoder_attn_layer_norm"], x[:text_rows])
                y = attend_text(p.get("encoder_attn"), h, *text)
                x = x + (y if text_rows == rows else mx.pad(y, [(0, rows - text_rows), (0, 0)]))
            h = norm(p["final_layer_norm"], x)
            return x + lin(p["fc2"], act(lin(p["fc1"], h)))

        def embed(tables: list[mx.array], tokens: mx.array, position: mx.array) -> mx.array:
            x = position
            for k, table in enumerate(tables):
                x = x + table[tokens[:, k]]
            return x

        def logits(final_norm: dict, lm_heads: list[dict], x: mx.array) -> mx.array:
            h = norm(final_norm, x)
            return mx.stack([lin(p, h) for p in lm_heads], axis=1).astype(mx.float32)

        self._attention_in = mx.compile(attention_in)
        self._attention_out = mx.compile(attention_out)
        self._embed = mx.compile(embed)
        self._logits = mx.compile(logits)
        self.layers = [self._step_parameters(layer) for layer in decoder.layers]
        self.tables = [e.weight for e in decoder.embed_tokens]
        self.norm = decoder.layer_norm.parameters()
        self.lm_heads = [h.parameters() for h in decoder.lm_heads]
        if small_product and not weight_first:
            self.layers, self.lm_heads = in_pieces(
                [self.layers, self.lm_heads], rows, small_product
            )
            mx.eval(self.layers, self.lm_heads)  # views of the weights: no copies
        self.positions = decoder._positions.astype(decoder.dtype)
        mask = cross.mask
        if mask is None:
            mask = mx.ones((rows, 1, 1, text_len), dtype=mx.bool_)
        mask = mask[:text_rows]
        text_kv = cross.kv or [None] * len(decoder.layers)
        self.cross = []
        for layer, kv in zip(decoder.layers, text_kv, strict=True):
            if not text_rows:
                self.cross.append(())
                continue
            k, v = kv
            k, v = k[:text_rows], v[:text_rows]
            if self.fold_cross:
                folded = fold_cross_attention(layer.encoder_attn, k, v, quant)
                # layer by layer: a quantized layer's dequantized weights exist one at a time
                mx.eval(folded)
                self.cross.append((*folded, mask.reshape(text_rows, 1, text_len)))
            else:
                self.cross.append((k, v, mask))
        self.cache = cache
        self._cpu_mkl = _blas.kind == "mkl" and mx.default_device() == mx.cpu
        self.heads, self.scale = heads, scale
        self.fused = None  # the layers' inputs to the fused kernels (see _fused_layers)
        if self.kernels is not None:
            self.fused = [
                self._fused_parameters(*layer)
                for layer in zip(self.layers, self.cross, text_kv, strict=True)
            ]
            mx.eval(self.fused)

    def _fused_parameters(self, p: dict, cross: tuple, text_kv: tuple | None) -> tuple:
        """A layer's inputs to the fused kernels: attention_inputs' parameters and quantization,
        layer_rest's weights, its cross-attention inputs (none, folded, or the projections with the
        text's K/V) and its quantization (a quantized decoder's scales and biases, else none).

        A Melody layer has no cross-attention norm: layer_rest, which does not read it without text,
        gets the final norm's parameters in its place."""
        a, e = p["self_attn"], p.get("encoder_attn")
        norm = p["self_attn_layer_norm"]
        inputs = (
            norm["weight"],
            norm["bias"],
            *(a[n]["weight"] for n in ("q_proj", "k_proj", "v_proj")),
        )

        def quantization(*linears: dict) -> list[mx.array]:
            return [t for q in linears for t in (q["scales"], q["biases"])] if self.bits else []

        first = quantization(*(a[n] for n in ("q_proj", "k_proj", "v_proj")))
        rest = quantization(a["out_proj"], p["fc1"], p["fc2"])
        ffn_norm = p["final_layer_norm"]
        text_norm = p.get("encoder_attn_layer_norm", ffn_norm)
        weights = [
            a["out_proj"]["weight"],
            text_norm["weight"],
            text_norm["bias"],
            ffn_norm["weight"],
            ffn_norm["bias"],
            p["fc1"]["weight"],
            p["fc2"]["weight"],
        ]
        if not self.text_rows:
            return inputs, first, weights, [], rest
        *folded, mask = cross
        keep = mask.reshape(self.text_rows, -1).astype(mx.float32)
        if self.fold_cross:
            return inputs, first, weights, [*folded, keep], rest
        k, v = (t[: self.text_rows] for t in text_kv)
        projected = [e["q_proj"]["weight"], e["out_proj"]["weight"], keep, k, v]
        return inputs, first, weights, projected, rest

    def _step_parameters(self, layer: DecoderLayer) -> dict:
        """The parameters of `layer` a step reads (the text's keys/values are computed already)."""
        p = layer.parameters()
        e = p.pop("encoder_attn", None)
        if self.text_rows and not self.fold_cross:
            p["encoder_attn"] = {"q_proj": e["q_proj"], "out_proj": e["out_proj"]}
        return p

    def __call__(self, tokens: mx.array, offset: int) -> mx.array:
        """Logits (rows, codebooks, vocab) in float32 for tokens (rows, codebooks) at position offset."""
        x = self._embed(self.tables, tokens, self.positions[offset])
        if self.kernels is not None:
            return self._logits(self.norm, self.lm_heads, self._fused_layers(x, offset))
        for p, cache, cross in zip(self.layers, self.cache, self.cross, strict=True):
            q, k, v = self._attention_in(p, x)
            keys, values = cache.update(k, v, offset)
            x = self._attention_out(p, x, self._self_attention(q, keys, values), *cross)
        return self._logits(self.norm, self.lm_heads, x)

    def _fused_layers(self, x: mx.array, offset: int) -> mx.array:
        """The layers on the fused kernels: two operations a layer around the cache write."""
        kernels, heads, rows, bits = self.kernels, self.heads, x.shape[0], self.bits
        for (inputs, first, weights, cross, rest), cache in zip(
            self.fused, self.cache, strict=True
        ):
            qkv = kernels.attention_inputs(x, *inputs, self.scale, 1e-5, first, bits)
            k, v = (qkv[i : i + 1].reshape(rows, heads, 1, -1) for i in (1, 2))  # views
            keys, values = cache.update(k, v, offset)
            x = kernels.layer_rest(
                x, qkv, keys, values, weights, cross, heads, self.text_rows, self.scale, 1e-5,
                rest, bits,
            )  # fmt: skip
        return x

    def bytes_per_step(self, offset: int) -> dict[str, int]:
        """Bytes a step at `offset` reads: the weights and text tensors it uses, and the self-attention
        keys/values of positions 0..offset (the token embeddings, 1 row per codebook, are left out)."""
        weights = _nbytes([self.layers, self.norm, self.lm_heads, self.cross])
        rows, heads, _, head_dim = self.cache[0].keys.shape
        kv = 2 * len(self.cache) * rows * heads * head_dim * self.cache[0].keys.itemsize
        kv *= offset + 1
        return {"weights": weights, "kv": kv, "total": weights + kv}

    def _self_attention(self, q: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        """Single-query attention over the filled cache. On the CPU with MKL: one stream, and from
        FAST_EXP_FROM keys the softmax with `exp_nonpositive` (steps at ~750 / ~1450: 99.4 -> 93.1 /
        111.7 -> 103.9 ms; with OpenBLAS and two streams no gain: 184.2 -> 188.2 / 208.0 -> 207.3 ms).
        Otherwise on the CPU: the scores in chunks of SCORE_CHUNK keys and, once the cache holds 256
        positions, half the rows on a second stream.

        Each head's products are small matrix-vector products that OpenBLAS runs on one thread, so
        the second core would idle: splitting the rows (e.g. the two CFG halves) over two CPU streams
        makes the attention of a long cache almost twice as fast. Below ~256 positions the streams'
        synchronisation costs more than it saves (measured: 24 layers at 50 positions, 4.6 ms split
        vs 3.6 ms not; at 300, 13.8 vs 14.4 ms).
        """
        half = q.shape[0] // 2
        side = self._side
        if side is None:  # a GPU, or MKL
            fast = self._cpu_mkl and keys.shape[2] >= FAST_EXP_FROM
            return single_query_attention(q, keys, values, fast_exp=fast)
        chunk = SCORE_CHUNK
        if half == 0 or keys.shape[2] < 256:
            return single_query_attention(q, keys, values, chunk=chunk)
        with mx.stream(side):
            second = single_query_attention(q[half:], keys[half:], values[half:], chunk=chunk)
        first = single_query_attention(q[:half], keys[:half], values[:half], chunk=chunk)
        return mx.concatenate([first, second])


def fold_cross_attention(
    attention: Attention, keys: mx.array, values: mx.array, quantization=None
) -> tuple[mx.array, mx.array]:
    """The query and output projections folded into the text's keys/values (batch, heads, len, d).

    With h the normed state of a row: scores = (scale K_h Wq_h) h, per head, and the output
    Wo concat_h(w_h V_h) = sum_h (Wo_h V_h^T) w_h. Returns the per-row matrices (batch, heads * len,
    width) giving the scores and (batch, width, heads * len) giving the output from the weights.
    """
    batch, heads, length, head_dim = keys.shape
    wq, wo = (_dense_weight(p, quantization) for p in (attention.q_proj, attention.out_proj))
    dims = wq.shape[1]
    to_scores = (keys.astype(mx.float32) * attention.scale) @ wq.reshape(heads, head_dim, dims)
    per_head_out = wo.reshape(dims, heads, head_dim).transpose(1, 0, 2)  # Wo_h: (heads, dims, d)
    from_weights = (per_head_out @ values.astype(mx.float32).swapaxes(-1, -2)).transpose(0, 2, 1, 3)
    return (
        to_scores.reshape(batch, heads * length, dims).astype(keys.dtype),
        from_weights.reshape(batch, dims, heads * length).astype(keys.dtype),
    )


def _dense_weight(linear_layer: nn.Module, quantization) -> mx.array:
    """A linear layer's weight in float32, dequantized if needed."""
    p = linear_layer.parameters()
    if "scales" not in p:
        return p["weight"].astype(mx.float32)
    group_size, bits = quantization
    return mx.dequantize(p["weight"], p["scales"], p["biases"], group_size, bits)


def _fused_bits(decoder: MusicgenDecoder) -> int | None:
    """The bits of the layers' quantized projections and feed-forward (0: none quantized; None: some
    are and some are not, as when a width is below the group size)."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    linears = [
        lin
        for layer in decoder.layers
        for lin in (*(getattr(layer.self_attn, n) for n in names), layer.fc1, layer.fc2)
    ]
    quantized = {"scales" in lin for lin in linears}
    if quantized == {False}:
        return 0
    return decoder.quant_bits if quantized == {True} else None


def _leading_true(flags: list[bool]) -> int:
    """How many rows the cross-attention must run: all of them unless the rows without text are
    exactly the trailing ones (as in classifier-free guidance)."""
    n = flags.index(False) if False in flags else len(flags)
    return n if not any(flags[n:]) else len(flags)


def _nbytes(tree) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def _side_stream() -> mx.Stream | None:
    """A second CPU stream (shared with EnCodec's) for the attention of half the rows and half the
    products' pieces, or None.

    None on a GPU, and with MKL: its small products are threaded, and two streams calling them at
    once run slower than one (24 layers at 1450 positions: 47 ms on one stream, 65 ms split).
    """
    if mx.default_device() != mx.cpu or _blas.kind == "mkl":
        return None
    return cpu_streams()[0]


class MusicgenDecoder(nn.Module):
    """Token embeddings summed over codebooks, sinusoidal positions, decoder layers, one LM head per codebook."""

    def __init__(self, config: MusicgenDecoderConfig):
        super().__init__()
        self.config = config
        dims, k = config.hidden_size, config.num_codebooks
        self.embed_tokens = [nn.Embedding(config.vocab_size + 1, dims) for _ in range(k)]
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(dims)
        self.lm_heads = [nn.Linear(dims, config.vocab_size, bias=False) for _ in range(k)]
        if config.has_enc_to_dec_proj:
            self.enc_to_dec_proj = nn.Linear(config.encoder_hidden_size, dims)
        if config.has_chroma_proj:
            self.audio_enc_to_dec_proj = nn.Linear(config.num_chroma, dims)
        self._positions = sinusoidal_positions(config.max_position_embeddings, dims)
        self.quant_bits: int | None = None  # set by quantize_decoder
        self.quant_group_size: int | None = None
        #: the self-attention K/V cache's dtype (None: the decoder's); float16 halves what a long
        #: generation reads per step and holds, at a small cost in precision (docs/benchmarks.md)
        self.kv_dtype: mx.Dtype | None = None

    @property
    def dtype(self) -> mx.Dtype:
        return self.layer_norm.weight.dtype

    @property
    def cache_dtype(self) -> mx.Dtype:
        """The K/V cache's dtype: `kv_dtype`, else the decoder's."""
        return self.kv_dtype or self.dtype

    def cross_states(
        self, encoder_states: mx.array, encoder_mask: mx.array | None = None
    ) -> CrossState:
        """Project the text states, zero the padding, and compute every layer's cross-attention K/V once.

        A row whose mask is all zeros (the unconditional half of classifier-free guidance) attends
        uniformly to its zeroed states, giving exactly 0 like transformers (no NaN). Melody has no
        cross-attention: an empty state (its conditioning is `conditioning_prefix`).
        """
        if not self.config.cross_attention:
            return CrossState([], None)
        x = self._project_text(encoder_states)
        mask = has_text = None
        if encoder_mask is not None:
            keep = encoder_mask.astype(mx.bool_)
            x = x * keep[..., None].astype(x.dtype)
            has_text = mx.any(keep, axis=-1)
            mask = (keep | ~has_text[:, None])[:, None, None, :]
        kv = [layer.encoder_attn.key_values(x) for layer in self.layers]
        return CrossState(kv, mask, has_text)

    def _project_text(self, encoder_states: mx.array) -> mx.array:
        x = encoder_states.astype(self.dtype)
        return self.enc_to_dec_proj(x) if "enc_to_dec_proj" in self else x

    def conditioning_prefix(
        self, encoder_states: mx.array | None, encoder_mask: mx.array | None, chroma: mx.array
    ) -> mx.array:
        """Melody's conditioning, the start of its decoder sequence (batch, chroma_length [+ len], dims).

        As transformers: the chroma (batch, frames, num_chroma) projected and repeated or cut to
        `chroma_length` frames, then the projected text states with padding zeroed (not masked: the
        decoder attends to every prefix position). No text (None): the chroma alone.
        """
        c = self.config
        x = chroma.astype(self.dtype)
        if "audio_enc_to_dec_proj" in self:
            x = self.audio_enc_to_dec_proj(x)
        frames = x.shape[1]
        if frames < c.chroma_length:
            x = mx.tile(x, (1, -(-c.chroma_length // frames), 1))
        parts = [x[:, : c.chroma_length]]
        if encoder_states is not None:
            text = self._project_text(encoder_states)
            if encoder_mask is not None:
                text = text * encoder_mask[..., None].astype(text.dtype)
            parts.append(text)
        return mx.concatenate(parts, axis=1)

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Fresh per-layer caches for `max_len` positions, in `kv_dtype` (None: the decoder's dtype)."""
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        return [
            KVCache(batch, c.num_attention_heads, max_len, head_dim, self.cache_dtype)
            for _ in self.layers
        ]

    def token_step(
        self,
        cross: CrossState,
        cache: list[KVCache],
        fold_cross: bool | None = None,
        weight_first: bool | None = None,
        small_product: int | None = None,
        split_products: bool | None = None,
        kernels: bool | None = None,
    ) -> TokenStep:
        """The fast single-token step of a generation over `cross` and `cache` (see TokenStep).

        `weight_first`, `small_product` (0: off) and `split_products` (the pieces over two CPU
        streams) pick the products' form; None: the BLAS's best. `kernels`: the fused CPU kernels
        (`musicgen.cpu_kernels`) for the layers, the LM heads and the final layer norm; None: where
        they run."""
        return TokenStep(
            self, cross, cache, fold_cross, weight_first, small_product, split_products, kernels
        )

    def embed(self, tokens: mx.array) -> mx.array:
        """Sum of the per-codebook embeddings of tokens (batch, codebooks, len) -> (batch, len, dims)."""
        x = self.embed_tokens[0](tokens[:, 0])
        for k in range(1, len(self.embed_tokens)):
            x = x + self.embed_tokens[k](tokens[:, k])
        return x

    def __call__(
        self,
        tokens: mx.array | None,
        cross: CrossState,
        cache: list[KVCache] | None = None,
        offset: int | mx.array = 0,
        prefix: mx.array | None = None,
    ) -> mx.array:
        """Logits (batch, codebooks, len, vocab) for tokens (batch, codebooks, len) at positions offset..

        With a cache, an int offset attends over the filled positions only (the fast path); an int32
        array offset of shape (1,) attends over the whole buffer with a mask. `prefix` (batch, P,
        dims): Melody's `conditioning_prefix`, placed before the tokens (None: the prefix alone, an
        int offset); the logits then cover the prefix too, as transformers'.
        """
        if prefix is not None:
            x = prefix if tokens is None else mx.concatenate([prefix, self.embed(tokens)], axis=1)
        else:
            x = self.embed(tokens)
        n = x.shape[1]
        if isinstance(offset, int):
            x = x + self._positions[offset : offset + n].astype(self.dtype)
            if n == 1:
                mask = None
            elif offset == 0:
                mask = "causal"
            else:
                mask = mx.arange(offset + n)[None, :] <= (offset + mx.arange(n))[:, None]
        else:
            positions = offset + mx.arange(n, dtype=mx.int32)
            x = x + mx.take(self._positions, positions, axis=0).astype(self.dtype)
            mask = None
            if cache is not None:
                mask = mx.arange(cache[0].max_len, dtype=mx.int32)[None, :] <= positions[:, None]
        if cache is None:
            mask = "causal" if n > 1 else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            text_kv = cross.kv[i] if cross.kv else None
            x = layer(x, mask, text_kv, cross.mask, layer_cache, offset)
        x = self.layer_norm(x)
        return mx.stack([head(x) for head in self.lm_heads], axis=1)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face decoder names (composite prefix stripped) -> this module's names."""
        out = {}
        for name, w in weights.items():
            if "embed_positions" in name:
                continue
            out[name.removeprefix("model.decoder.")] = w
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: mx.Dtype | None = None) -> MusicgenDecoder:
        """Load from a local MusicGen (composite) folder."""
        from musicgen.weights import load_state_dict

        path = Path(path)
        config = MusicgenDecoderConfig.from_dict(json.loads((path / "config.json").read_text()))
        weights = load_state_dict(path)
        weights = {
            k[len("decoder.") :] if k.startswith("decoder.") else k: v
            for k, v in weights.items()
            if k.startswith(("decoder.", "enc_to_dec_proj.", "audio_enc_to_dec_proj."))
        }
        model = cls(config)
        model.load_weights(list(cls.sanitize(weights).items()))
        if dtype is not None:
            model.set_dtype(dtype)
        mx.eval(model.parameters())
        return model


def _quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    return len(shape) == 2 and not name.startswith("embed_tokens") and shape[-1] % group_size == 0


def quantize_weights(
    weights: dict[str, mx.array], bits: int, group_size: int = 64
) -> dict[str, mx.array]:
    """Quantize sanitized decoder weights (linear layers only): name.weight -> weight, scales, biases."""
    out = {}
    for name, w in weights.items():
        if name.endswith(".weight") and _quantizable(name, w.shape, group_size):
            base = name[: -len(".weight")]
            out[name], out[f"{base}.scales"], out[f"{base}.biases"] = mx.quantize(
                w, group_size=group_size, bits=bits
            )
        else:
            out[name] = w
    return out


def weights_quantizer(bits: int, group_size: int = 64):
    """quantize_weights as a one-argument function (for the conversion cache, keyed on this file)."""

    def quantize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return quantize_weights(weights, bits, group_size)

    return quantize


def quantize_decoder(
    decoder: MusicgenDecoder, bits: int, group_size: int = 64, only: dict | None = None
) -> MusicgenDecoder:
    """Quantize the decoder's linear layers in place (with `only`: those whose weights carry scales)."""
    if bits not in (4, 8):
        raise ValueError(f"quantize must be 4 or 8 bits, got {bits}")

    def predicate(path: str, m: nn.Module) -> bool:
        if only is not None:
            return f"{path}.scales" in only
        return isinstance(m, nn.Linear) and _quantizable(path, m.weight.shape, group_size)

    nn.quantize(decoder, group_size=group_size, bits=bits, class_predicate=predicate)
    decoder.quant_bits, decoder.quant_group_size = bits, group_size
    return decoder
