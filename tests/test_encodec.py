"""EnCodec parity with transformers' EncodecModel (tests/fixtures/expected/encodec.npz)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from encodec import EncodecConfig, EncodecModel
from musicgen import _blas

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected" / "encodec.npz"
CHECKPOINTS = ("tiny-musicgen", "tiny-encodec", "tiny-musicgen-2023")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(EXPECTED))


@pytest.fixture(scope="module", params=CHECKPOINTS)
def model(request) -> EncodecModel:
    return EncodecModel.from_pretrained(FIXTURES / request.param)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def long_test_signal() -> np.ndarray:
    """The 30 s signal of scripts/make_reference_fixtures.py (not stored in the fixtures)."""
    t = np.arange(30 * 32000, dtype=np.float64) / 32000
    sig = 0.4 * np.sin(2 * np.pi * 220.0 * t)
    sig += 0.25 * np.sin(2 * np.pi * 331.7 * t) * np.cos(np.pi * 0.5 * t)
    sig += 0.1 * np.sign(np.sin(2 * np.pi * 3.0 * t))
    return sig.astype(np.float32)


def test_config_from_musicgen_small_values():
    d = {
        "audio_channels": 1,
        "codebook_dim": 128,
        "codebook_size": 2048,
        "hidden_size": 128,
        "num_filters": 64,
        "sampling_rate": 32000,
        "target_bandwidths": [2.2],
        "upsampling_ratios": [8, 5, 4, 4],
        "use_causal_conv": False,
        "use_conv_shortcut": False,
        "model_type": "encodec",
        "some_future_key": 1,
    }
    config = EncodecConfig.from_dict(d)
    assert (config.hop_length, config.frame_rate, config.num_quantizers) == (640, 50, 4)
    assert EncodecConfig.from_dict({"hidden_size": 16}).codebook_dim == 16
    # transformers' defaults (the 24 kHz model): 32 codebooks at 24 kbps, 75 Hz
    config = EncodecConfig()
    assert (config.hop_length, config.frame_rate, config.num_quantizers) == (320, 75, 32)


def test_properties(model):
    assert model.sampling_rate == 32000
    assert model.frame_rate == 50
    assert model.hop_length == 640
    assert model.num_codebooks == 4


def test_sanitize_layouts_and_weight_norm():
    rng = np.random.default_rng(0)
    v_conv = rng.standard_normal((6, 4, 3)).astype(np.float32)  # PyTorch Conv1d (out, in, K)
    g_conv = rng.uniform(0.5, 2, (6, 1, 1)).astype(np.float32)
    v_tr = rng.standard_normal((4, 2, 8)).astype(np.float32)  # ConvTranspose1d (in, out, K)
    g_tr = rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32)
    names = {
        "decoder.layers.0.conv": (g_conv, v_conv),
        "decoder.layers.3.conv": (g_tr, v_tr),
        "decoder.layers.6.conv": (g_conv, v_conv),
    }
    for g_name, v_name in (
        ("weight_g", "weight_v"),
        ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ):
        weights = {"quantizer.layers.0.codebook.embed": mx.zeros((8, 2))}
        for buffer in ("embed_avg", "cluster_size", "inited"):
            weights[f"quantizer.layers.0.codebook.{buffer}"] = mx.zeros((1,))
        for base, (g, v) in names.items():
            weights[f"{base}.{g_name}"] = mx.array(g)
            weights[f"{base}.{v_name}"] = mx.array(v).astype(mx.float16)
        out = EncodecModel.sanitize(weights)
        assert sorted(out) == [*(f"{b}.weight" for b in names), "quantizer.layers.0.embed"]
        v16 = v_conv.astype(np.float16).astype(np.float32)
        ref = g_conv * v16 / np.linalg.norm(v16.reshape(6, -1), axis=1)[:, None, None]
        assert out["decoder.layers.0.conv.weight"].dtype == mx.float32
        np.testing.assert_allclose(
            out["decoder.layers.0.conv.weight"], ref.transpose(0, 2, 1), rtol=1e-6
        )
        v16 = v_tr.astype(np.float16).astype(np.float32)
        ref = g_tr * v16 / np.linalg.norm(v16.reshape(4, -1), axis=1)[:, None, None]
        np.testing.assert_allclose(
            out["decoder.layers.3.conv.weight"], ref.transpose(1, 2, 0), rtol=1e-6
        )


def test_sanitize_lstm_sums_biases():
    w = {
        "encoder.layers.13.lstm.weight_ih_l1": mx.ones((8, 2)),
        "encoder.layers.13.lstm.weight_hh_l1": mx.zeros((8, 2)),
        "encoder.layers.13.lstm.bias_ih_l1": mx.full((8,), 0.25),
        "encoder.layers.13.lstm.bias_hh_l1": mx.full((8,), 0.5),
    }
    out = EncodecModel.sanitize(w)
    assert sorted(out) == [f"encoder.layers.13.layers.1.{n}" for n in ("Wh", "Wx", "bias")]
    np.testing.assert_array_equal(out["encoder.layers.13.layers.1.bias"], np.full(8, 0.75))


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_decode_parity(model, expected, frames):
    codes = mx.array(expected[f"decode_codes_{frames}"])
    audio = model.decode(codes)
    assert audio.dtype == mx.float32
    assert audio.shape == (1, frames * 640, 1)
    ref = expected[f"decode_audio_{frames}"].transpose(0, 2, 1)
    assert rel_err(np.array(audio), ref) <= 1e-4


def test_decode_parity_30s(model, expected):
    audio = np.array(model.decode(mx.array(expected["decode_codes_1500"])))[..., 0]
    assert audio.shape == (1, 1500 * 640)
    for key, part in (
        ("head", audio[:, :8192]),
        ("tail", audio[:, -8192:]),
        ("sub32", audio[:, ::32]),
    ):
        assert rel_err(part, expected[f"decode_audio_1500_{key}"][:, 0]) <= 1e-4, key


@pytest.mark.parametrize("blas", ["openblas", "mkl"])
def test_decode_batch_matches_single(model, expected, monkeypatch, blas):
    """Two rows through the LSTM (as W @ h^T for OpenBLAS, h @ W^T for MKL) decode as one does."""
    monkeypatch.setattr(_blas, "kind", blas)
    a, b = expected["decode_codes_7"], expected["decode_codes_50"][..., :7]
    batch = np.array(model.decode(mx.array(np.concatenate([a, b]))))
    single = np.array(model.decode(mx.array(b)))
    np.testing.assert_allclose(batch[1:], single, atol=1e-6 * np.abs(single).max())


def test_decode_with_the_lstm_in_pieces(model, expected, monkeypatch):
    """The LSTM's recurrent product in small-matrix pieces, every other one on a second stream (the
    form for OpenBLAS's AVX-512 kernels), decodes as transformers does, for one row and for two."""
    hidden = 2**4 * 2  # the fixture's LSTM width: 2 filters, 4 upsampling ratios
    # 5 rows of W_hh (4 x 32 rows of 32) a piece for one row, 2 for two: 26 and 64 pieces
    monkeypatch.setattr(_blas, "small_product_limit", lambda: 5 * hidden)
    a, b = expected["decode_codes_7"], expected["decode_codes_50"][..., :7]
    ref = expected["decode_audio_7"].transpose(0, 2, 1)
    assert rel_err(np.array(model.decode(mx.array(a))), ref) <= 1e-4
    batch = np.array(model.decode(mx.array(np.concatenate([a, b]))))
    assert rel_err(batch[:1], ref) <= 1e-4
    monkeypatch.undo()
    single = np.array(model.decode(mx.array(b)))
    np.testing.assert_allclose(batch[1:], single, atol=1e-6 * np.abs(single).max())


@pytest.mark.parametrize("name", ["1f", "20f", "odd"])
def test_encode_parity(model, expected, name):
    audio = mx.array(expected[f"encode_audio_{name}"]).transpose(
        0, 2, 1
    )  # (batch, samples, channels)
    codes = model.encode(audio)
    ref = expected[f"encode_codes_{name}"]
    assert codes.dtype == mx.int32
    assert codes.shape == ref.shape == (1, 4, -(-audio.shape[1] // 640))
    np.testing.assert_array_equal(np.array(codes), ref)


def test_encode_parity_30s(model, expected):
    codes = np.array(model.encode(mx.array(long_test_signal())[None, :, None]))
    ref = expected["encode_codes_30s"]
    assert codes.shape == ref.shape == (1, 4, 1500)
    assert (codes == ref).mean() >= 0.999


def test_composite_and_standalone_load_the_same_weights():
    a = dict(tree_flatten(EncodecModel.from_pretrained(FIXTURES / "tiny-musicgen").parameters()))
    b = dict(tree_flatten(EncodecModel.from_pretrained(FIXTURES / "tiny-encodec").parameters()))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    config = json.loads((FIXTURES / "tiny-musicgen" / "config.json").read_text())["audio_encoder"]
    assert EncodecConfig.from_dict(config).num_filters == 2


def test_elu_two_stream_split_matches_reference():
    from encodec.encodec import ELU

    x = (
        mx.random.normal((1, (1 << 22) // 3 + 5, 3), key=mx.random.key(0)) * 3
    )  # above the split size
    ref = np.array(x)
    ref = np.where(ref > 0, ref, np.expm1(np.minimum(ref, 0)))
    np.testing.assert_allclose(np.array(ELU()(x)), ref, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ convolution helpers at real widths


def reflect_pad(x: np.ndarray, left: int, right: int) -> np.ndarray:
    """transformers' EncodecConv1d._pad1d in reflect mode on (B, T, C): zero-extend when too short."""
    extra = max(left, right) - x.shape[1] + 1 if x.shape[1] <= max(left, right) else 0
    if extra:
        x = np.pad(x, [(0, 0), (0, extra), (0, 0)])
    y = np.pad(x, [(0, 0), (left, right), (0, 0)], mode="reflect")
    return y[:, : y.shape[1] - extra]


def ref_conv1d_module(x, w, b, stride, dilation, act):
    """transformers' non-causal EncodecConv1d.forward (reflect padding, extra right padding),
    with the convolution itself done by mx.conv1d."""
    kernel = (w.shape[1] - 1) * dilation + 1
    padding_total = kernel - stride
    length = x.shape[1]
    n_frames = math.ceil((length - kernel + padding_total) / stride + 1) - 1
    extra = n_frames * stride + kernel - padding_total - length
    right = padding_total // 2
    if act:
        x = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    x = reflect_pad(x, padding_total - right, right + extra)
    y = mx.conv1d(mx.array(x), mx.array(w), stride=stride, dilation=dilation) + mx.array(b)
    return np.array(y)


def ref_conv_transpose1d_module(x, w, b, stride, act):
    """transformers' non-causal EncodecConvTranspose1d.forward: mx.conv_transpose1d, then trimmed."""
    if act:
        x = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    y = np.array(mx.conv_transpose1d(mx.array(x), mx.array(w), stride=stride) + mx.array(b))
    padding_total = w.shape[1] - stride
    right = padding_total // 2
    return y[:, padding_total - right : y.shape[1] - right]


def random_conv(in_ch: int, out_ch: int, kernel: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, kernel, in_ch)) / math.sqrt(in_ch * kernel)
    w = w.astype(np.float32)
    b = rng.standard_normal(out_ch).astype(np.float32)
    return w, b


# (in, out, kernel, stride, dilation, length): the widths of EnCodec 32 kHz (num_filters 64, hidden 128,
# ratios 8 5 4 4), one per branch of _conv1d: im2col (kernel * in <= 64), narrow output (out <= 8),
# per-tap products, and stride s with kernel m * s (frames of s samples) or not
CONV_CASES = [
    (1, 64, 7, 1, 1, 300),  # encoder input conv: im2col
    (64, 1, 7, 1, 1, 300),  # decoder output conv: narrow output, one product and shifted sums
    (512, 512, 3, 1, 1, 40),  # residual conv: per-tap addmm
    (512, 512, 3, 1, 3, 40),  # dilated
    (512, 256, 3, 1, 1, 40),  # the residual block's compress=2 conv
    (256, 512, 1, 1, 1, 40),  # 1x1
    (128, 1024, 7, 1, 1, 30),  # decoder input conv
    (64, 128, 8, 4, 1, 203),  # encoder downsampling, K = 2 * stride: framed
    (512, 1024, 16, 8, 1, 171),  # framed, per-tap
    (16, 24, 5, 2, 1, 51),  # K not a multiple of the stride: mx.conv1d
    (8, 8, 3, 2, 2, 51),  # strided and dilated: mx.conv1d
]


@pytest.mark.parametrize("act", [False, True], ids=["plain", "elu"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "{}-{}-k{}-s{}-d{}".format(*c[:5]))
def test_conv1d_matches_mx_conv1d_at_real_widths(case, act):
    from encodec.encodec import ELU, EncodecConv1d

    in_ch, out_ch, kernel, stride, dilation, length = case
    config = EncodecConfig(use_causal_conv=False, pad_mode="reflect")
    layer = EncodecConv1d(config, in_ch, out_ch, kernel, stride=stride, dilation=dilation)
    w, b = random_conv(in_ch, out_ch, kernel, seed=in_ch + out_ch + kernel)
    layer.conv.weight, layer.conv.bias = mx.array(w), mx.array(b)
    x = np.random.default_rng(1).standard_normal((2, length, in_ch)).astype(np.float32)
    got = np.array(layer(mx.array(x), ELU() if act else None))
    ref = ref_conv1d_module(x, w, b, stride, dilation, act)
    assert got.shape == ref.shape == (2, -(-length // stride), out_ch)
    assert rel_err(got, ref) <= 1e-5


# (in, out, kernel, stride, frames): the decoder's upsampling convolutions, and odd shapes
TRANSPOSED_CASES = [
    (1024, 512, 16, 8, 9),
    (512, 256, 10, 5, 12),
    (256, 128, 8, 4, 20),
    (128, 64, 8, 4, 30),
    (4, 3, 7, 3, 11),  # K not a multiple of the stride (zero-padded taps)
    (2, 5, 3, 3, 5),  # K = stride: nothing trimmed
]


@pytest.mark.parametrize("act", [False, True], ids=["plain", "elu"])
@pytest.mark.parametrize("case", TRANSPOSED_CASES, ids=lambda c: "{}-{}-k{}-s{}".format(*c[:4]))
def test_conv_transpose1d_matches_mx_conv_transpose1d_at_real_widths(case, act):
    from encodec.encodec import ELU, EncodecConvTranspose1d

    in_ch, out_ch, kernel, stride, frames = case
    config = EncodecConfig(use_causal_conv=False, pad_mode="reflect")
    layer = EncodecConvTranspose1d(config, in_ch, out_ch, kernel, stride=stride)
    w, b = random_conv(in_ch, out_ch, kernel, seed=in_ch + kernel)
    layer.conv.weight, layer.conv.bias = mx.array(w), mx.array(b)
    x = np.random.default_rng(2).standard_normal((2, frames, in_ch)).astype(np.float32)
    got = np.array(layer(mx.array(x), ELU() if act else None))
    ref = ref_conv_transpose1d_module(x, w, b, stride, act)
    assert got.shape == ref.shape == (2, frames * stride, out_ch)
    assert rel_err(got, ref) <= 1e-5


def test_mx_conv_transpose1d_is_pytorchs():
    """The reference above: output[t * s + k] += W[:, k] @ x[t] (PyTorch's ConvTranspose1d), unflipped."""
    w, b = random_conv(3, 2, 5, seed=0)
    x = np.random.default_rng(3).standard_normal((1, 4, 3)).astype(np.float32)
    ref = np.zeros((1, 3 * 2 + 5, 2), np.float32) + b
    for t in range(4):
        for k in range(5):
            ref[0, t * 2 + k] += w[:, k] @ x[0, t]
    got = np.array(mx.conv_transpose1d(mx.array(x), mx.array(w), stride=2) + mx.array(b))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


MUSICGEN_SMALL_ENCODEC = dict(
    audio_channels=1, codebook_dim=128, codebook_size=2048, hidden_size=128, num_filters=64,
    sampling_rate=32000, target_bandwidths=[2.2], upsampling_ratios=[8, 5, 4, 4],
    use_causal_conv=False, use_conv_shortcut=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "widths, frames",
    [("tiny", 500), ("real", 64)],  # the tiny fixture; musicgen-small's EnCodec, random weights
)
def test_decode_peak_memory_is_linear_in_length(widths, frames):
    """Nothing quadratic in time: decoding 4x the frames needs at most 4.5x the memory above the
    weights (the largest tensors are activations at the audio rate, linear in length)."""
    if widths == "tiny":
        model = EncodecModel.from_pretrained(FIXTURES / "tiny-musicgen")
    else:
        model = EncodecModel(EncodecConfig(**MUSICGEN_SMALL_ENCODEC))
        model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.parameters()))
        mx.eval(model.parameters())
    rng = np.random.default_rng(0)

    def peak(n: int) -> int:
        codes = mx.array(rng.integers(0, 2048, (1, 4, n)).astype(np.int32))
        mx.eval(codes)
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        audio = model.decode(codes)
        mx.eval(audio)
        assert audio.shape == (1, n * 640, 1)
        return mx.get_peak_memory() - before

    peak(8)  # warm up (compiled LSTM step)
    small, large = peak(frames), peak(4 * frames)
    assert small > 4 * frames * 640 * 4  # several times the output: not dominated by fixed costs
    assert large <= 4.5 * small, (small, large)


# ------------------------------------------------------------------ chunked decode


@pytest.mark.parametrize("frames", [1, 16, 17, 40, 50])  # 1, one chunk exactly, not multiples of it
def test_chunked_decode_matches_whole(model, frames):
    """Decoding after the LSTM in chunks of 16 frames (with the halo) gives the unchunked audio."""
    codes = mx.array(
        np.random.default_rng(frames).integers(0, 2048, (2, 4, frames)).astype(np.int32)
    )
    whole = np.array(model.decode(codes, chunk_frames=0))
    chunked = np.array(model.decode(codes, chunk_frames=16))
    assert chunked.shape == whole.shape == (2, frames * 640, 1)
    assert np.abs(chunked - whole).max() <= 1e-6 * np.abs(whole).max()


def test_time_group_norm_decodes_whole():
    """time_group_norm normalizes over all of time: not local, so never chunked."""
    config = EncodecConfig(
        num_filters=2,
        hidden_size=8,
        codebook_size=16,
        upsampling_ratios=[4, 2],
        norm_type="time_group_norm",
    )
    model = EncodecModel(config)
    model.update(
        tree_map(
            lambda p: 0.3 * mx.random.normal(p.shape, key=mx.random.key(1)), model.parameters()
        )
    )
    codes = mx.array(np.random.default_rng(0).integers(0, 16, (1, 2, 40)).astype(np.int32))
    whole = np.array(model.decode(codes, chunk_frames=0))
    np.testing.assert_array_equal(np.array(model.decode(codes, chunk_frames=16)), whole)


def test_chunked_decode_needs_the_halo(model, monkeypatch):
    """Without the halo, the samples next to the chunk edges differ (the test above is sensitive)."""
    assert model.decoder.halo_frames() == 1  # 482 samples of the 640 of a frame
    codes = mx.array(np.random.default_rng(0).integers(0, 2048, (1, 4, 40)).astype(np.int32))
    whole = np.array(model.decode(codes, chunk_frames=0))
    monkeypatch.setattr(model.decoder, "halo_frames", lambda: 0)
    chunked = np.array(model.decode(codes, chunk_frames=16))
    assert np.abs(chunked - whole).max() > 1e-3 * np.abs(whole).max()


def test_receptive_margin_bounds_the_decoder_after_the_lstm():
    """Changing one frame of the LSTM output changes the audio only within `receptive_margin()`
    samples of that frame's hop, and the bound is reached."""
    from encodec.encodec import _apply

    decoder = EncodecModel.from_pretrained(FIXTURES / "tiny-musicgen").decoder
    margin, hop = decoder.receptive_margin(), decoder.hop_length
    width = decoder.layers[1].layers[0].Wh.shape[1]
    h = np.random.default_rng(0).standard_normal((1, 21, width)).astype(np.float32)
    base = np.array(_apply(decoder.layers[2:], mx.array(h)))
    h[:, 10] += 1
    changed = np.abs(np.array(_apply(decoder.layers[2:], mx.array(h))) - base).max(axis=(0, 2))
    idx = np.nonzero(changed)[0]
    left, right = 10 * hop - idx.min(), idx.max() - (11 * hop - 1)
    assert max(left, right) == margin == 482, (left, right, margin)


def test_chunked_decode_peak_memory_at_real_widths():
    """30 s at musicgen-small's EnCodec widths (random weights), the default (chunked) path: the peak
    above the weights is bounded by a chunk, below the whole-sequence decode of a fifth of the length
    (before chunking: 2.0 GiB for 1500 frames, 1.3-1.5 MiB per frame)."""
    model = EncodecModel(EncodecConfig(**MUSICGEN_SMALL_ENCODEC))
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)

    def peak(n: int, chunk_frames: int | None) -> int:
        codes = mx.array(rng.integers(0, 2048, (1, 4, n)).astype(np.int32))
        mx.eval(codes)
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        audio = model.decode(codes, chunk_frames)
        mx.eval(audio)
        assert audio.shape == (1, n * 640, 1)
        return mx.get_peak_memory() - before

    peak(8, None)  # warm up (compiled LSTM step)
    whole_300, chunked_1500 = peak(300, 0), peak(1500, None)
    assert chunked_1500 <= whole_300, (chunked_1500, whole_300)
    assert chunked_1500 <= 512 * 2**20, chunked_1500
