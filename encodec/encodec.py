"""EnCodec neural audio codec (Hugging Face transformers' `EncodecModel`) in MLX, channels-last."""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from musicgen import _blas, cpu_kernels


@dataclass
class EncodecConfig:
    """EnCodec hyper-parameters, as in transformers' `EncodecConfig` (same field names and defaults)."""

    sampling_rate: int = 24_000
    audio_channels: int = 1
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True
    target_bandwidths: list[float] = field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 24.0])

    def __post_init__(self):
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        self.upsampling_ratios = list(self.upsampling_ratios)
        self.target_bandwidths = list(self.target_bandwidths)

    @classmethod
    def from_dict(cls, d: dict) -> EncodecConfig:
        """Build from a Hugging Face config dict, ignoring unknown keys."""
        params = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in d.items() if k in params})

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def codebook_nbits(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))


WEIGHT_NORM_PARTS = {
    "weight_g": "g",
    "weight_v": "v",
    "parametrizations.weight.original0": "g",
    "parametrizations.weight.original1": "v",
}
LSTM_NAMES = {"weight_ih": "Wx", "weight_hh": "Wh", "bias_ih": "bias", "bias_hh": "bias"}


def _fuse_weight_norm(g: mx.array, v: mx.array) -> mx.array:
    """PyTorch weight norm g * v / ||v|| in float32, the norm over the axes where g has size 1 (dim=0)."""
    g, v = g.astype(mx.float32), v.astype(mx.float32)
    axes = [i for i in range(v.ndim) if g.shape[i] == 1]
    return v * (g / mx.sqrt((v * v).sum(axis=axes, keepdims=True)))


def _pad1d(x: mx.array, left: int, right: int, mode: str, act: ELU | None = None) -> mx.array:
    """Pad the time axis of (batch, time, channels), applying `act` first (fused into the one copy).

    Reflect mode zero-extends inputs too short to reflect, like transformers.
    """
    if left == 0 and right == 0:
        return act(x) if act is not None else x
    if mode not in ("constant", "reflect", "replicate"):
        raise ValueError(f"Unsupported pad_mode {mode!r}")
    length = x.shape[1]
    extra = max(left, right) - length + 1 if mode == "reflect" and length <= max(left, right) else 0
    if extra:
        x = mx.pad(act(x) if act is not None else x, [(0, 0), (0, extra), (0, 0)])
        act = None
    n = x.shape[1]
    if mode == "constant":
        head = mx.zeros((x.shape[0], left, x.shape[2]), x.dtype)
        tail = mx.zeros((x.shape[0], right, x.shape[2]), x.dtype)
    elif mode == "replicate":
        head = mx.repeat(x[:, :1], left, axis=1)
        tail = mx.repeat(x[:, -1:], right, axis=1)
    else:
        stop = n - 2 - right
        head = x[:, left:0:-1]
        tail = x[:, n - 2 : stop if stop >= 0 else None : -1]
    middle = act.pieces(x) if act is not None else [x]
    if act is not None:
        head, tail = act(head), act(tail)
    x = mx.concatenate([head, *middle, tail], axis=1)
    return x[:, : x.shape[1] - extra] if extra else x


def _apply(layers: list[nn.Module], x: mx.array) -> mx.array:
    """Run layers in order; an ELU is fused into the padding copy of the convolution after it."""
    act = None
    for layer in layers:
        if isinstance(layer, ELU):
            act = layer
        elif isinstance(layer, (EncodecConv1d, EncodecConvTranspose1d)):
            x, act = layer(x, act), None
        else:
            x, act = layer(act(x) if act is not None else x), None
    return act(x) if act is not None else x


def _conv1d(
    x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, dilation: int = 1
) -> mx.array:
    """Valid 1-d convolution as matrix products (faster than MLX's CPU conv for these shapes).

    x: (B, L, in) already padded, weight: (out, K, in) -> (B, (L - (K - 1) * dilation - 1) // stride + 1, out).
    """
    out_ch, kernel, in_ch = weight.shape
    if stride > 1:
        if dilation != 1 or kernel % stride:
            return mx.conv1d(x, weight, stride=stride, dilation=dilation) + bias
        # stride s with K = m * s: a stride-1 conv with m taps over frames of s samples
        batch, length, _ = x.shape
        frames = length // stride
        x = x[:, : frames * stride].reshape(batch, frames, stride * in_ch)
        weight = weight.reshape(out_ch, kernel // stride, stride * in_ch)
        return _conv1d(x, weight, bias)
    n = x.shape[1] - (kernel - 1) * dilation
    taps = [x[:, k * dilation : k * dilation + n] for k in range(kernel)]
    if kernel * in_ch <= 64:  # tiny input width: im2col, one product
        cols = mx.concatenate(taps, axis=-1) if kernel > 1 else taps[0]
        return mx.addmm(bias, cols, weight.reshape(out_ch, kernel * in_ch).T)
    if out_ch <= 8:  # tiny output width: one product for all taps, then shifted sums
        z = x @ weight.transpose(2, 1, 0).reshape(in_ch, kernel * out_ch)
        z = z.reshape(x.shape[0], x.shape[1], kernel, out_ch)
        y = bias
        for k in range(kernel):
            y = y + z[:, k * dilation : k * dilation + n, k]
        return y
    y = mx.addmm(bias, taps[0], weight[:, 0].T)
    for k in range(1, kernel):
        y = mx.addmm(y, taps[k], weight[:, k].T)
    return y


class ELU(nn.Module):
    """ELU (alpha 1) as max(x, 0) + expm1(min(x, 0)): fewer passes than mx.where, exact near 0."""

    def __call__(self, x: mx.array) -> mx.array:
        parts = self.pieces(x)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

    def pieces(self, x: mx.array) -> list[mx.array]:
        """ELU of x as consecutive chunks of time (for a caller that concatenates anyway)."""
        small = x.size < _SPLIT_ELEMENTS or x.shape[1] < 2
        if small or mx.default_device() != mx.cpu or _elu_kernel(x):  # the kernel uses both cores
            return [_elu(x)]
        # MLX's CPU element-wise ops are single-threaded: the two halves of time run on two streams
        half = x.shape[1] // 2
        with mx.stream(cpu_streams()[0]):
            a = _elu(x[:, :half])
        with mx.stream(cpu_streams()[1]):
            b = _elu(x[:, half:])
        return [a, b]


def _elu(x: mx.array) -> mx.array:
    kernels = _elu_kernel(x)
    if kernels:  # vectorized over both cores: ~1 s less for 30 s of audio
        return kernels.elu(x)
    return mx.maximum(x, 0) + mx.expm1(mx.minimum(x, 0))


def _elu_kernel(x: mx.array):
    """Our CPU kernels (musicgen.cpu_kernels) where they run x's ELU, else None."""
    if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return None
    return cpu_kernels.load()


_STREAMS: list = []
_SPLIT_ELEMENTS = 1 << 20  # 4 MiB: decoding in chunks keeps the split for the 128-channel layers


def cpu_streams() -> list:
    """Two extra CPU streams (created once) for splitting work over both cores (also the decoder's)."""
    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(2))
    return _STREAMS


def row_pieces(w: mx.array, rows: int, limit: int) -> list[mx.array]:
    """W's rows, transposed, in pieces of at most limit // (rows x in) rows: for x @ W^T, x with `rows` rows."""
    piece = max(1, limit // (rows * w.shape[1]))
    return [w[i : i + piece].T for i in range(0, w.shape[0], piece)]


def product_in_pieces(
    x: mx.array, pieces: list[mx.array], side: mx.Stream | None = None
) -> mx.array:
    """x @ W^T from W's `row_pieces`, every other piece on the stream `side` if given.

    OpenBLAS's AVX-512 kernels run each piece with their small-matrix code (`_blas.small_product_limit`),
    which does not pack the weight but runs on one thread: `side`, a second CPU stream, is the second core.
    """
    products = [None] * len(pieces)
    products[::2] = [x @ p for p in pieces[::2]]
    with mx.stream(side) if side is not None else nullcontext():
        products[1::2] = [x @ p for p in pieces[1::2]]
    return mx.concatenate(products, axis=-1)


class EncodecConv1d(nn.Module):
    """Conv1d with EnCodec's causal or centred padding (plus extra right padding for full frames)."""

    def __init__(
        self,
        config: EncodecConfig,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
    ):
        super().__init__()
        self.causal = config.use_causal_conv
        self.pad_mode = config.pad_mode
        self.stride = stride
        self.dilation = dilation
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, stride, dilation=dilation)
        if config.norm_type == "time_group_norm":
            self.norm = nn.GroupNorm(1, out_ch, pytorch_compatible=True)
        self.kernel = (kernel_size - 1) * dilation + 1
        self.padding_total = self.kernel - stride
        # stride 1: output i reads inputs i - left ... i + right, spread = max(left, right)
        self.spread = (
            self.padding_total if self.causal else self.padding_total - self.padding_total // 2
        )

    def __call__(self, x: mx.array, act: ELU | None = None) -> mx.array:
        length = x.shape[1]
        n_frames = math.ceil((length - self.kernel + self.padding_total) / self.stride + 1) - 1
        extra = n_frames * self.stride + self.kernel - self.padding_total - length
        if self.causal:
            x = _pad1d(x, self.padding_total, extra, self.pad_mode, act)
        else:
            right = self.padding_total // 2
            x = _pad1d(x, self.padding_total - right, right + extra, self.pad_mode, act)
        x = _conv1d(x, self.conv.weight, self.conv.bias, self.stride, self.dilation)
        return self.norm(x) if "norm" in self else x


def _conv_transpose1d(
    x: mx.array, weight: mx.array, bias: mx.array, stride: int, act: ELU | None = None
) -> mx.array:
    """Transposed convolution as a stride-1 convolution producing `stride` samples per input frame.

    x: (B, T, in), weight: (out, K, in) -> (B, (T - 1) * stride + K, out). With K = m * stride, output
    block t (stride samples) is sum_j x[t - j] @ W_j: m taps over the zero-padded input (MLX's CPU
    conv_transpose is far slower).
    """
    out_ch, kernel, in_ch = weight.shape
    taps = -(-kernel // stride)
    if taps * stride != kernel:
        weight = mx.pad(weight, [(0, 0), (0, taps * stride - kernel), (0, 0)])
    # (out, m, s, in) -> (s * out, m, in) with the taps reversed: row r * out + o of tap i is W[o, (m-1-i) s + r]
    w = weight.reshape(out_ch, taps, stride, in_ch)[:, ::-1].transpose(2, 0, 1, 3)
    w = w.reshape(stride * out_ch, taps, in_ch)
    x = _pad1d(x, taps - 1, taps - 1, "constant", act)
    y = _conv1d(x, w, mx.tile(bias, stride))
    batch, blocks, _ = y.shape
    return y.reshape(batch, blocks * stride, out_ch)[:, : (blocks - taps) * stride + kernel]


class EncodecConvTranspose1d(nn.Module):
    """ConvTranspose1d whose fixed padding is trimmed like transformers does."""

    def __init__(
        self, config: EncodecConfig, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1
    ):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_ch, out_ch, kernel_size, stride)
        if config.norm_type == "time_group_norm":
            self.norm = nn.GroupNorm(1, out_ch, pytorch_compatible=True)
        padding_total = kernel_size - stride
        if config.use_causal_conv:
            self.trim_right = math.ceil(padding_total * config.trim_right_ratio)
        else:
            self.trim_right = padding_total // 2
        self.trim_left = padding_total - self.trim_right

    def __call__(self, x: mx.array, act: ELU | None = None) -> mx.array:
        x = _conv_transpose1d(x, self.conv.weight, self.conv.bias, self.conv.stride, act)
        if "norm" in self:
            x = self.norm(x)
        return x[:, self.trim_left : x.shape[1] - self.trim_right]


@mx.compile
def _lstm_cell(gates: mx.array, c: mx.array) -> tuple[mx.array, mx.array]:
    """The new (h, c) from an LSTM step's gates (B, 4H): PyTorch gate order i, f, g, o."""
    i, f, g, o = mx.split(gates, 4, axis=-1)
    c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
    return mx.sigmoid(o) * mx.tanh(c), c


@mx.compile
def _lstm_step(
    gx: mx.array, h: mx.array, c: mx.array, wh: mx.array, weight_first: bool
) -> tuple[mx.array, mx.array]:
    """One LSTM step from precomputed input gates gx (B, 4H), the recurrent product whole.

    With OpenBLAS, one row runs faster as h @ W^T (1500 steps at H = 1024: 1.35 s instead of 1.75 s),
    two rows as W @ h^T (1.75 s instead of 1.95 s), as with MKL on an AMD CPU (two layers of 500 steps:
    0.68 s instead of 0.83 s); with MKL on an Intel CPU, h @ W^T always (two rows, 500 steps: 0.31 s
    instead of 0.52 s): `weight_first` is `_blas.weight_first()`.
    """
    one_product = h.shape[0] == 1 or not weight_first
    gates = mx.addmm(gx, h, wh.T) if one_product else gx + (wh @ h.T).T
    return _lstm_cell(gates, c)


def lstm_recurrence(gx: mx.array, recurrent: Callable[[mx.array], mx.array]) -> mx.array:
    """The hidden states (B, T, H) of an LSTM from its input gates gx (B, T, 4H), with `recurrent`(h)
    giving h @ Wh^T (uncompiled, so that it may put work on other streams)."""
    h = c = mx.zeros((gx.shape[0], gx.shape[2] // 4), dtype=gx.dtype)
    hs = []
    for t in range(gx.shape[1]):
        h, c = _lstm_cell(gx[:, t] + recurrent(h), c)
        hs.append(h)
    return mx.stack(hs, axis=1)


class LSTM(nn.Module):
    """One LSTM layer (same parameters as mlx.nn.LSTM); input projections for all steps in one matmul."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.Wx = mx.zeros((4 * hidden_size, input_size))
        self.Wh = mx.zeros((4 * hidden_size, hidden_size))
        self.bias = mx.zeros((4 * hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        """With OpenBLAS's AVX-512 kernels the recurrent product runs in small-matrix pieces over two
        CPU streams (`product_in_pieces`): 1500 steps at H = 1024, 1.15-1.18 s whole, 0.64-0.65 s in
        pieces on one stream, 0.51-0.53 s on two."""
        gx = mx.addmm(self.bias, x, self.Wx.T)
        rows = x.shape[0]
        limit = _blas.small_product_limit() if mx.default_device() == mx.cpu else None
        if limit and rows * self.Wh.size > limit:
            pieces, side = row_pieces(self.Wh, rows, limit), cpu_streams()[0]
            return lstm_recurrence(gx, lambda h: product_in_pieces(h, pieces, side))
        h = c = mx.zeros((rows, self.Wh.shape[1]), dtype=x.dtype)
        hs = []
        weight_first = mx.default_device() == mx.cpu and _blas.weight_first()
        for t in range(x.shape[1]):
            h, c = _lstm_step(gx[:, t], h, c, self.Wh, weight_first)
            hs.append(h)
        return mx.stack(hs, axis=1)


class EncodecLSTM(nn.Module):
    """Stacked LSTM over time with a skip connection."""

    def __init__(self, config: EncodecConfig, dim: int):
        super().__init__()
        self.layers = [LSTM(dim, dim) for _ in range(config.num_lstm_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.layers:
            h = layer(h)
        return h + x


class EncodecResnetBlock(nn.Module):
    """SEANet residual block: ELU, conv(k, dilation), ELU, conv(1), plus a (conv) shortcut."""

    def __init__(self, config: EncodecConfig, dim: int, dilations: tuple[int, int]):
        super().__init__()
        hidden = dim // config.compress
        kernels = (config.residual_kernel_size, 1)
        chans = (dim, hidden, dim)
        self.block = []
        for i, (k, d) in enumerate(zip(kernels, dilations, strict=True)):
            self.block += [ELU(), EncodecConv1d(config, chans[i], chans[i + 1], k, dilation=d)]
        if config.use_conv_shortcut:
            self.shortcut = EncodecConv1d(config, dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = _apply(self.block, x)
        return (self.shortcut(x) if "shortcut" in self else x) + h


class EncodecEncoder(nn.Module):
    """SEANet encoder: audio (B, samples, channels) -> embeddings (B, frames, hidden_size)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        c = config
        layers = [EncodecConv1d(c, c.audio_channels, c.num_filters, c.kernel_size)]
        scale = 1
        for ratio in reversed(c.upsampling_ratios):
            dim = scale * c.num_filters
            for j in range(c.num_residual_layers):
                layers.append(EncodecResnetBlock(c, dim, (c.dilation_growth_rate**j, 1)))
            layers += [ELU(), EncodecConv1d(c, dim, dim * 2, ratio * 2, stride=ratio)]
            scale *= 2
        layers += [EncodecLSTM(c, scale * c.num_filters), ELU()]
        layers.append(EncodecConv1d(c, scale * c.num_filters, c.hidden_size, c.last_kernel_size))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        return _apply(self.layers, x)


class EncodecDecoder(nn.Module):
    """SEANet decoder: embeddings (B, frames, hidden_size) -> audio (B, frames * hop, channels)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        c = config
        scale = 2 ** len(c.upsampling_ratios)
        layers = [EncodecConv1d(c, c.hidden_size, scale * c.num_filters, c.kernel_size)]
        layers.append(EncodecLSTM(c, scale * c.num_filters))
        for ratio in c.upsampling_ratios:
            dim = scale * c.num_filters
            layers += [ELU(), EncodecConvTranspose1d(c, dim, dim // 2, ratio * 2, stride=ratio)]
            for j in range(c.num_residual_layers):
                layers.append(EncodecResnetBlock(c, dim // 2, (c.dilation_growth_rate**j, 1)))
            scale //= 2
        layers += [ELU(), EncodecConv1d(c, c.num_filters, c.audio_channels, c.last_kernel_size)]
        self.layers = layers
        self.hop_length = c.hop_length
        self.local_after_lstm = c.norm_type != "time_group_norm"  # that norm pools over all of time

    def __call__(self, x: mx.array, chunk_frames: int | None = None) -> mx.array:
        """Decode embeddings; with `chunk_frames`, everything after the LSTM runs chunk by chunk.

        The first convolution and the LSTM run over the whole sequence (frame rate, small). The rest of
        the stack is local, so it runs over chunks of about `chunk_frames` frames, each with a halo of
        `halo_frames()` frames of context on each side (none at the true ends of the sequence, where the
        layers' own padding applies as unchunked); only each chunk's central samples are kept, and each
        chunk is evaluated before the next, so the audio-rate activations of one chunk at a time are
        alive. The result equals the unchunked decode: every kept sample sees the same inputs.
        """
        frames = x.shape[1]
        if not chunk_frames or frames <= chunk_frames or not self.local_after_lstm:
            return _apply(self.layers, x)
        h = _apply(self.layers[:2], x)  # first conv + LSTM
        mx.eval(h)
        halo, hop = self.halo_frames(), self.hop_length
        n_chunks = -(-frames // chunk_frames)
        bounds = [round(i * frames / n_chunks) for i in range(n_chunks + 1)]
        pieces = []
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = max(0, start - halo), min(frames, stop + halo)
            y = _apply(self.layers[2:], h[:, lo:hi])
            y = y[:, (start - lo) * hop : (stop - lo) * hop]
            mx.eval(y)
            pieces.append(y)
        return mx.concatenate(pieces, axis=1)

    def receptive_margin(self) -> int:
        """Output samples next to a chunk's edge that can differ from the unchunked decode.

        The layers after the LSTM, walked forward from an exact input cut at a chunk edge: a stride-1
        convolution with padding (left, right) spreads an inexact zone of e samples to e + max(left,
        right) (its output i reads inputs i - left ... i + right); a transposed convolution with stride
        s, trimmed (left, right), to e * s + max(left, right) (the cut-off input frames contribute to
        the first `right` and last `left` samples); a residual block adds its convolutions' spreads (the
        shortcut is pointwise); an ELU is pointwise.
        """
        zone = 0
        for layer in self.layers[2:]:
            if isinstance(layer, EncodecConvTranspose1d):
                zone = zone * layer.conv.stride + max(layer.trim_left, layer.trim_right)
            elif isinstance(layer, EncodecConv1d) and layer.stride == 1:
                zone += layer.spread
            elif isinstance(layer, EncodecResnetBlock):
                convs = [*layer.block, layer.shortcut] if "shortcut" in layer else layer.block
                zone += sum(m.spread for m in convs if isinstance(m, EncodecConv1d))
            elif not isinstance(layer, ELU):
                raise TypeError(f"non-local layer after the LSTM: {type(layer).__name__}")
        return zone

    def halo_frames(self) -> int:
        """Frames of context a chunk needs on each side (see __call__): the receptive margin in frames."""
        return -(-self.receptive_margin() // self.hop_length)


class EncodecCodebook(nn.Module):
    """One Euclidean codebook of the residual vector quantizer."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.embed = mx.zeros((config.codebook_size, config.codebook_dim))

    def encode(self, x: mx.array) -> mx.array:
        """Index of the nearest codeword for each vector of x (..., dim)."""
        embed = self.embed
        dist = (x * x).sum(-1, keepdims=True) - 2 * (x @ embed.T) + (embed * embed).sum(-1)
        return mx.argmin(dist, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embed[codes]


class EncodecQuantizer(nn.Module):
    """Residual vector quantizer."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.layers = [EncodecCodebook(config) for _ in range(config.num_quantizers)]

    def encode(self, x: mx.array, num_quantizers: int) -> mx.array:
        """Embeddings (B, T, D) -> codes (B, K, T)."""
        codes = []
        for layer in self.layers[:num_quantizers]:
            idx = layer.encode(x)
            x = x - layer.decode(idx)
            codes.append(idx)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        """Codes (B, K, T) -> summed codewords (B, T, D)."""
        out = self.layers[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            out = out + self.layers[k].decode(codes[:, k])
        return out


class EncodecModel(nn.Module):
    """EnCodec: audio <-> discrete codes (the audio tokenizer of MusicGen)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        if config.chunk_length_s is not None or config.normalize:
            raise NotImplementedError(
                "chunked / normalized EnCodec (48 kHz model) is not supported"
            )
        self.config = config
        self.encoder = EncodecEncoder(config)
        self.decoder = EncodecDecoder(config)
        self.quantizer = EncodecQuantizer(config)
        self.decode_chunk_frames = 200

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def num_codebooks(self) -> int:
        return self.config.num_quantizers

    @property
    def channels(self) -> int:
        return self.config.audio_channels

    def num_codebooks_for_bandwidth(self, bandwidth: float | None) -> int:
        """Codebooks used at a target bandwidth in kbps (None: the first target bandwidth)."""
        if bandwidth is None:
            bandwidth = self.config.target_bandwidths[0]
        per_codebook = math.log2(self.config.codebook_size) * self.frame_rate
        return int(max(1, math.floor(bandwidth * 1000 / per_codebook)))

    def encode(self, audio: mx.array, bandwidth: float | None = None) -> mx.array:
        """Audio (batch, samples, channels) -> int32 codes (batch, num_codebooks, ceil(samples / hop))."""
        if audio.ndim == 2:
            audio = audio[..., None]
        embeddings = self.encoder(audio.astype(self.quantizer.layers[0].embed.dtype))
        return self.quantizer.encode(embeddings, self.num_codebooks_for_bandwidth(bandwidth))

    def decode(self, codes: mx.array, chunk_frames: int | None = None) -> mx.array:
        """Int32 codes (batch, num_codebooks, frames) -> float32 audio (batch, frames * hop, channels).

        Inputs longer than `chunk_frames` (default `decode_chunk_frames`; 0: never) are decoded in
        chunks after the LSTM (see `EncodecDecoder.__call__`; each chunk is evaluated as it goes): the
        same result, with the audio-rate activations of one chunk alive at a time instead of the whole
        sequence's (30 s: about 0.3 instead of 2.1 GiB above the weights at musicgen-small's widths).
        """
        if chunk_frames is None:
            chunk_frames = self.decode_chunk_frames
        audio = self.decoder(self.quantizer.decode(codes), chunk_frames)
        return audio.astype(mx.float32)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face EnCodec names and layouts -> this module's (weight norm fused, MLX conv layout)."""
        out: dict[str, mx.array] = {}
        norm_parts: dict[str, dict[str, mx.array]] = {}
        for name, w in weights.items():
            if name.endswith(("embed_avg", "cluster_size", "inited")):
                continue
            for suffix, part in WEIGHT_NORM_PARTS.items():
                if name.endswith(suffix):
                    norm_parts.setdefault(name[: -len(suffix)] + "weight", {})[part] = w
                    break
            else:
                out[name.replace(".codebook.embed", ".embed")] = w
        for name, p in norm_parts.items():
            out[name] = _fuse_weight_norm(p["g"], p["v"])
        # the decoder's top-level convolutions other than the first and the last are transposed ones
        top = sorted(
            int(n.split(".")[2])
            for n in out
            if re.fullmatch(r"decoder\.layers\.\d+\.conv\.weight", n)
        )
        transposed = {f"decoder.layers.{i}.conv.weight" for i in top[1:-1]}
        for name in list(out):
            w = out[name]
            if ".lstm." in name:
                del out[name]
                prefix, pname = name.split(".lstm.")
                kind, layer = pname.rsplit("_l", 1)
                key = f"{prefix}.layers.{layer}." + LSTM_NAMES[kind]
                if key in out:  # bias_ih + bias_hh, summed in float32
                    w = out[key].astype(mx.float32) + w.astype(mx.float32)
                out[key] = w
            elif name.endswith("conv.weight") and w.ndim == 3:
                # PyTorch Conv1d (out, in, K), ConvTranspose1d (in, out, K) -> MLX (out, K, in)
                out[name] = w.transpose(1, 2, 0) if name in transposed else w.transpose(0, 2, 1)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: mx.Dtype = mx.float32) -> EncodecModel:
        """Load from a MusicGen composite folder (its `audio_encoder`) or a standalone EnCodec folder."""
        from musicgen.weights import DECODER_MODEL_TYPES, load_state_dict

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        weights = load_state_dict(path)
        if config.get("model_type") in DECODER_MODEL_TYPES:  # a composite MusicGen folder
            config = config["audio_encoder"]
            prefix = "audio_encoder."
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        model = cls(EncodecConfig.from_dict(config))
        weights = cls.sanitize(weights)
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        return model
