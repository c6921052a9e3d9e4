"""The fused CPU kernels (musicgen/csrc/cpu_kernels.cpp) against MLX's own operations."""

import mlx.core as mx
import numpy as np
import pytest

from musicgen import cpu_kernels
from musicgen.model import gelu, single_query_attention


@pytest.fixture
def kernels():
    """The compiled kernels (built on the first use, in the test's cache)."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    loaded = cpu_kernels.load()
    assert loaded is not None, "the kernels failed to build or their check against MLX"
    return loaded


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (rows, out, in): every row count (1-4: four weight rows at a time; 5-8: three); out not a multiple
# of 4 or 3 (the one- or two-row tail) and in not a multiple of 16 (the masked tail); large enough (out x in
# >= 2^16) to split over the helper thread
@pytest.mark.parametrize(
    "shape",
    [
        (1, 7, 5),
        (2, 37, 40),
        (3, 37, 40),
        (4, 21, 33),
        (2, 4096, 1024),
        (1, 1027, 1000),
        (2, 2048, 1024),
        (4, 1027, 1000),
        (5, 37, 40),
        (6, 2048, 1024),
        (7, 21, 33),
        (8, 1027, 1000),
    ],
)
def test_few_row_product_is_x_times_w_transposed(kernels, shape):
    rows, out, width = shape
    key_x, key_w = mx.random.split(mx.random.key(sum(shape)))
    x, w = mx.random.normal((rows, width), key=key_x), mx.random.normal((out, width), key=key_w)
    y = kernels.few_row_product(x, w)
    assert y.shape == (rows, out) and y.dtype == mx.float32
    assert rel_err(y, np.array(x, np.float64) @ np.array(w, np.float64).T) <= 1e-5


def test_few_row_product_takes_batched_rows_and_views(kernels):
    """x (batch, 1, in) like a step's state, strided views of x (read as they are) and a row slice
    of a weight (a view into a larger buffer, as a layer's rows)."""
    x = mx.random.normal((2, 1, 48), key=mx.random.key(0))
    w = mx.random.normal((100, 48), key=mx.random.key(1))
    assert kernels.few_row_product(x, w).shape == (2, 1, 100)
    assert rel_err(kernels.few_row_product(x, w[40:90]), x @ w[40:90].T) <= 1e-5
    xt = mx.random.normal((48, 2), key=mx.random.key(2)).T
    assert rel_err(kernels.few_row_product(xt, w), xt @ w.T) <= 1e-5
    assert (
        rel_err(kernels.few_row_product(x[:, :, ::2], w[:, :24]), x[:, :, ::2] @ w[:, :24].T)
        <= 1e-5
    )


def test_few_row_product_rejects_what_it_does_not_run(kernels):
    w = mx.zeros((8, 16))
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.few_row_product(mx.zeros((9, 16)), w)
    with pytest.raises(ValueError, match="float32"):
        kernels.few_row_product(mx.zeros((2, 16), mx.float16), w)
    with pytest.raises(ValueError, match="float32"):
        kernels.few_row_product(mx.zeros((2, 15)), w)


# (rows, out, in): every row count, with its weight rows per pass (4, 3, 2, 1) and their tails; `in`
# one group of 64 or several; large enough to split over the helper thread
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "shape",
    [(1, 37, 64), (2, 1024, 1024), (3, 11, 128), (4, 4096, 1024), (5, 9, 192), (6, 2050, 512),
     (7, 13, 256), (8, 1027, 1024)],
)  # fmt: skip
def test_quantized_product_is_x_times_dequantized_w(kernels, shape, bits):
    rows, out, width = shape
    key_x, key_w = mx.random.split(mx.random.key(sum(shape) + bits))
    x, w = mx.random.normal((rows, width), key=key_x), mx.random.normal((out, width), key=key_w)
    q, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    y = kernels.quantized_product(x, q, scales, biases, bits)
    assert y.shape == (rows, out) and y.dtype == mx.float32
    dense = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=bits), np.float64)
    assert rel_err(y, np.array(x, np.float64) @ dense.T) <= 1e-5
    # x as a strided view, and batched (batch, 1, in) like a step's state
    xt = mx.random.normal((width, rows), key=key_x).T
    expected = np.array(xt, np.float64) @ dense.T
    assert rel_err(kernels.quantized_product(xt, q, scales, biases, bits), expected) <= 1e-5
    assert kernels.quantized_product(x[:, None], q, scales, biases, bits).shape == (rows, 1, out)


def test_quantized_product_rejects_what_it_does_not_run(kernels):
    w = mx.random.normal((8, 128))
    q, scales, biases = mx.quantize(w, group_size=64, bits=8)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        kernels.quantized_product(mx.zeros((9, 128)), q, scales, biases, 8)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        kernels.quantized_product(mx.zeros((2, 128)), q, scales, biases, 4)  # W's width says 8
    with pytest.raises(ValueError, match="float32 scales"):
        kernels.quantized_product(mx.zeros((2, 128)), q, scales.astype(mx.float16), biases, 8)
    q32, scales32, biases32 = mx.quantize(w, group_size=32, bits=8)
    with pytest.raises(ValueError, match="groups of 64"):
        kernels.quantized_product(mx.zeros((2, 128)), q32, scales32, biases32, 8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_layer_kernels_take_quantized_weights(kernels, bits, rows):
    """attention_inputs and layer_rest with 8- or 4-bit weights equal the float32 kernels on the
    dequantized weights (and so MLX's reference), with no text and with the text folded."""
    d, ffn, heads = 128, 256, 2
    keys = iter(mx.random.split(mx.random.key(rows + bits), 12))
    x = mx.random.normal((rows, d), key=next(keys))
    norm = list(mx.random.normal((2, d), key=next(keys)) * 0.1 + 1.0)
    dense = [
        mx.random.normal(shape, key=next(keys)) * shape[1] ** -0.5
        for shape in [(d, d)] * 4 + [(ffn, d), (d, ffn)]
    ]
    packed = [mx.quantize(w, group_size=64, bits=bits) for w in dense]
    dense = [mx.dequantize(*q, group_size=64, bits=bits) for q in packed]
    weights, extra = (
        [q[0] for q in packed],
        [[t for q in packed[i:j] for t in q[1:]] for i, j in ((0, 3), (3, 6))],
    )
    qkv = kernels.attention_inputs(x, *norm, *weights[:3], 0.125, 1e-5, extra[0], bits)
    expected = kernels.attention_inputs(x, *norm, *dense[:3], 0.125, 1e-5)
    assert rel_err(qkv, expected) <= 1e-5
    cache = [mx.random.normal((rows, heads, 40, d // heads), key=next(keys)) for _ in range(2)]
    text_rows = max(rows // 2, 1)
    folded = [
        mx.random.normal((text_rows, heads * 5, d), key=next(keys)) * d**-0.5,
        mx.random.normal((text_rows, d, heads * 5), key=next(keys)),
        mx.ones((text_rows, 5)),
    ]
    for cross, text in (([], 0), (folded, text_rows)):
        layer = [weights[3], *norm, *norm, weights[4], weights[5]]
        out = kernels.layer_rest(
            x, qkv, *cache, layer, cross, heads, text, 0.1, 1e-5, extra[1], bits
        )
        layer = [dense[3], *norm, *norm, dense[4], dense[5]]
        expected = kernels.layer_rest(x, qkv, *cache, layer, cross, heads, text, 0.1, 1e-5)
        assert (
            rel_err(out, layer_rest_reference(x, qkv, *cache, layer, cross, heads, text, 0.1))
            <= 1e-5
        )
        assert rel_err(out, expected) <= 1e-5


def test_layer_kernels_reject_quantization_they_do_not_run(kernels):
    x, qkv, keys, values, weights, cross = random_layer(2, 2, 8, 5, mx.float32, "projected", 1, 0)
    scales = mx.zeros((16, 1))
    with pytest.raises(ValueError, match="4-bit with their float32 scales"):  # bits, no scales
        kernels.attention_inputs(x, *weights[1:3], *[weights[0]] * 3, 1.0, 1e-5, [], 8)
    with pytest.raises(ValueError, match="no projected cross-attention"):
        kernels.layer_rest(x, qkv, keys, values, weights, cross, 2, 1, 1.0, 1e-5, [scales] * 6, 8)


def test_attention_inputs_are_the_normed_projections(kernels):
    """Layer norm then the scaled queries, the keys and the values, for 1 to 8 rows (a width not a
    multiple of 16, and one large enough to split over the helper thread)."""
    for rows, d in [(1, 40), (2, 40), (3, 40), (2, 1024), (4, 1024), (6, 40), (8, 1024)]:
        keys = mx.random.split(mx.random.key(d + rows), 4)
        x = mx.random.normal((rows, d), key=keys[0])
        weight, bias = mx.random.normal((2, d), key=keys[1]) * 0.5 + 1.0
        wq, wk, wv = mx.random.normal((3, d, d), key=keys[2]) * d**-0.5
        qkv = kernels.attention_inputs(x, weight, bias, wq, wk, wv, 0.125, 1e-5)
        h = mx.fast.layer_norm(x, weight, bias, 1e-5)
        assert qkv.shape == (3, rows, d) and qkv.dtype == mx.float32
        assert rel_err(qkv, mx.stack([h @ wq.T * 0.125, h @ wk.T, h @ wv.T])) <= 1e-5


def layer_rest_reference(x, qkv, keys, values, weights, cross, heads, text_rows, scale):
    """layer_rest as MLX's operations (the decoder step's form, see TokenStep)."""
    out_proj, text_w, text_b, ffn_w, ffn_b, fc1, fc2 = weights
    rows, d = x.shape
    q = qkv[0].reshape(rows, heads, 1, -1)
    y = x + single_query_attention(q, keys, values).reshape(rows, d) @ out_proj.T
    if cross:
        h = mx.fast.layer_norm(y[:text_rows], text_w, text_b, 1e-5)
        keep = cross[2][:, None] > 0  # (text rows, 1, text length)
        if len(cross) == 3:  # folded
            to_scores, from_weights, _ = cross
            scores = (to_scores @ h[:, :, None]).reshape(text_rows, heads, -1)
            attn = mx.softmax(mx.where(keep, scores, -mx.inf), axis=-1)
            text = (from_weights @ attn.reshape(text_rows, -1, 1)).reshape(text_rows, d)
        else:
            wq, wo, _, text_keys, text_values = cross
            tq = (h @ wq.T * scale).reshape(text_rows, heads, 1, -1)
            scores = tq @ text_keys.swapaxes(-1, -2)
            attn = mx.softmax(mx.where(keep[:, None], scores, -mx.inf), axis=-1) @ text_values
            text = attn.reshape(text_rows, d) @ wo.T
        y = mx.concatenate([y[:text_rows] + text, y[text_rows:]])
    h = mx.fast.layer_norm(y, ffn_w, ffn_b, 1e-5)
    return y + gelu(h @ fc1.T) @ fc2.T


def random_layer(rows, heads, head_dim, length, kv_dtype, text, text_rows, seed):
    """layer_rest's inputs: a cache filled to `length` (a strided view of a longer buffer), the
    layer's weights, and the cross-attention's (`text`: none, folded or projected) over a text of 5
    positions whose last one the first row does not attend to."""
    d, ffn, text_length = heads * head_dim, 3 * heads * head_dim, 5
    k = iter(mx.random.split(mx.random.key(seed), 12))
    x = mx.random.normal((rows, d), key=next(k))
    qkv = mx.random.normal((3, rows, d), key=next(k)) * head_dim**-0.25
    cache = (rows, heads, length + 7, head_dim)
    keys = mx.random.normal(cache, key=next(k)).astype(kv_dtype)[:, :, :length]
    values = mx.random.normal(cache, key=next(k)).astype(kv_dtype)[:, :, :length]
    norms = list(mx.random.normal((4, d), key=next(k)) * 0.3 + 1.0)
    weights = [
        mx.random.normal((d, d), key=next(k)) * d**-0.5,
        *norms,
        mx.random.normal((ffn, d), key=next(k)) * d**-0.5,
        mx.random.normal((d, ffn), key=next(k)) * ffn**-0.5,
    ]
    keep = mx.ones((text_rows, text_length)).at[0, -1].add(-1.0)
    if text == "none":
        return x, qkv, keys, values, weights, []
    if text == "folded":
        width = heads * text_length
        to_scores = mx.random.normal((text_rows, width, d), key=next(k)) * d**-0.5
        from_weights = mx.random.normal((text_rows, d, width), key=next(k))
        return x, qkv, keys, values, weights, [to_scores, from_weights, keep]
    wq, wo = mx.random.normal((2, d, d), key=next(k)) * d**-0.5
    # the text's keys/values as the decoder makes them: (batch, len, heads, d) transposed
    shape = (text_rows, text_length, heads, head_dim)
    text_keys = mx.random.normal(shape, key=next(k)).swapaxes(1, 2)
    text_values = mx.random.normal(shape, key=next(k)).swapaxes(1, 2)
    return x, qkv, keys, values, weights, [wq, wo, keep, text_keys, text_values]


# (rows, heads, length, head_dim, text rows): one position; lengths past a vector's 16 (masked
# tail); head_dim 8 (the tiny fixture), 64 (MusicGen) and 72 (a masked tail); the long cache, split
# over the helper thread; the text for one row of two (classifier-free guidance) or both, two of
# four (two prompts with guidance), three of three, three of six and four of eight (three and four
# prompts with guidance)
@pytest.mark.parametrize("kv_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("text", ["none", "folded", "projected"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 1, 8, 1),
        (2, 2, 19, 8, 2),
        (1, 3, 50, 72, 1),
        (2, 16, 100, 64, 1),
        (2, 16, 1450, 64, 2),
        (4, 4, 30, 16, 2),
        (3, 2, 19, 8, 3),
        (6, 4, 40, 64, 3),
        (8, 16, 300, 64, 4),
    ],
)
def test_layer_rest_is_the_decoder_layer(kernels, shape, text, kv_dtype):
    """Against the step's MLX operations, over a float32 or float16 cache."""
    rows, heads, length, head_dim, text_rows = shape
    text_rows = 0 if text == "none" else text_rows
    inputs = random_layer(rows, heads, head_dim, length, kv_dtype, text, text_rows, sum(shape))
    scale = head_dim**-0.5
    out = kernels.layer_rest(*inputs, heads, text_rows, scale, 1e-5)
    assert out.shape == (rows, heads * head_dim) and out.dtype == mx.float32
    # MLX's attention multiplies float16 values by float16 weights: within float16's rounding
    tolerance = 1e-5 if kv_dtype == mx.float32 else 2e-3
    expected = layer_rest_reference(*inputs, heads, text_rows, scale)
    assert rel_err(out, expected) <= tolerance


def self_attention(kernels, q, keys, values) -> mx.array:
    """The self-attention of q (rows, heads, 1, d) alone, through layer_rest: an identity output
    projection, a zero feed-forward, no text (the output is x + attention, with x = 0)."""
    rows, heads, _, head_dim = q.shape
    d = heads * head_dim
    qkv = mx.concatenate([q.reshape(1, rows, d), mx.zeros((2, rows, d))])
    ones, zeros = mx.ones((d,)), mx.zeros((d,))
    weights = [mx.eye(d), ones, zeros, ones, zeros, mx.zeros((4, d)), mx.zeros((d, 4))]
    out = kernels.layer_rest(mx.zeros((rows, d)), qkv, keys, values, weights, [], heads, 0, 1, 1e-5)
    return out.reshape(q.shape)


@pytest.mark.parametrize("kv_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", [(2, 2, 19, 8), (1, 3, 50, 72), (2, 16, 1450, 64)])
def test_self_attention_against_float64(kernels, shape, kv_dtype):
    """The attention alone against float64 of the same (float16) values, over a strided cache view,
    with a query whose heads are strided (a (rows, 1, heads, d) state transposed)."""
    rows, heads, length, head_dim = shape
    kq, kk, kv = mx.random.split(mx.random.key(length), 3)
    cache = (rows, heads, length + 7, head_dim)
    keys = mx.random.normal(cache, key=kk).astype(kv_dtype)[:, :, :length]
    values = mx.random.normal(cache, key=kv).astype(kv_dtype)[:, :, :length]
    q = mx.random.normal((rows, 1, heads, head_dim), key=kq).swapaxes(1, 2) * head_dim**-0.5
    out = self_attention(kernels, q, keys, values)
    scores = np.array(q, np.float64) @ np.array(keys, np.float64).swapaxes(-1, -2)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ np.array(values, np.float64)
    assert rel_err(out, expected) <= 1e-5


def test_self_attention_of_large_scores(kernels):
    """Scores far apart (exp underflows to 0 for all but the top key) and equal (a plain mean)."""
    keys = mx.concatenate([mx.full((1, 1, 1, 16), 10.0), mx.full((1, 1, 30, 16), -10.0)], axis=2)
    values = mx.random.normal((1, 1, 31, 16), key=mx.random.key(3))
    out = self_attention(kernels, mx.ones((1, 1, 1, 16)), keys, values)
    assert rel_err(out, values[:, :, :1]) <= 1e-6
    out = self_attention(kernels, mx.zeros((1, 1, 1, 16)), keys, values)
    assert rel_err(out, values.mean(axis=2, keepdims=True)) <= 1e-6


def test_the_layer_kernels_reject_what_they_do_not_run(kernels):
    x, qkv, keys, values, weights, cross = random_layer(2, 2, 8, 5, mx.float32, "folded", 1, 0)
    norm = weights[1:3]
    with pytest.raises(ValueError, match="rows <= 8"):
        kernels.attention_inputs(mx.zeros((9, 16)), *norm, *[weights[0]] * 3, 1.0, 1e-5)
    with pytest.raises(ValueError, match="float32 x"):
        kernels.attention_inputs(x.astype(mx.float16), *norm, *[weights[0]] * 3, 1.0, 1e-5)
    run = kernels.layer_rest
    with pytest.raises(ValueError, match="float32 or float16 keys"):
        run(
            x, qkv, keys.astype(mx.bfloat16), values.astype(mx.bfloat16), weights, cross, 2, 1, 1, 1
        )
    with pytest.raises(ValueError, match="float32 or float16 keys"):
        run(x, qkv, keys, values, weights, cross, 4, 1, 1.0, 1e-5)  # 4 heads of 4: not the cache's
    with pytest.raises(ValueError, match="to_scores"):
        run(x, qkv, keys, values, weights, cross[:2], 2, 1, 1.0, 1e-5)
    with pytest.raises(ValueError, match="to_scores"):
        run(x, qkv, keys, values, weights, cross, 2, 0, 1.0, 1e-5)  # text but no text rows
    with pytest.raises(ValueError, match="to_scores"):
        run(x, qkv, keys, values, weights[:6], cross, 2, 1, 1.0, 1e-5)
    wide = mx.zeros((1, 1, 3, 264))
    with pytest.raises(ValueError, match="float32 or float16 keys"):
        run(mx.zeros((1, 264)), mx.zeros((3, 1, 264)), wide, wide, weights, [], 1, 0, 1, 1e-5)


def test_the_kernels_build_into_the_cache_once(monkeypatch):
    """Into an empty cache: one library named by its source, toolchain and CPU, written whole (no
    temporary left), and not built again; MUSICGEN_MLX_KERNELS=0 keeps MLX's operations."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    path = cpu_kernels._library_path()
    assert not path.exists()  # this test's fresh cache
    assert cpu_kernels._build() == path and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.name.startswith("_cpu_kernels-") and path.name.endswith(".so")
    built = path.stat().st_mtime_ns
    assert cpu_kernels._build() == path and path.stat().st_mtime_ns == built
    module = cpu_kernels._import(path)
    cpu_kernels._check(module)
    monkeypatch.setenv("MUSICGEN_MLX_KERNELS", "0")
    assert not cpu_kernels.wanted()
    monkeypatch.setenv("MUSICGEN_MLX_KERNELS", "1")
    assert cpu_kernels.wanted()


def test_without_a_compiler_the_step_keeps_mlx_operations(monkeypatch, caplog):
    """No compiler (and no library built yet): one warning, and None (MLX's own operations)."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu_kernels.load.__wrapped__() is None
    assert [r.getMessage() for r in caplog.records] == [
        "musicgen CPU kernels unavailable (no C++ compiler (no-such-compiler; set CXX));"
        " using MLX's operations"
    ]


def test_a_failed_build_is_not_tried_again(tmp_path, monkeypatch, caplog):
    """A compiler that fails: its last line in the warning, and a marker so that the next process
    does not run it again (it says how to retry)."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    calls = tmp_path / "calls"
    compiler = tmp_path / "broken-g++"
    compiler.write_text(
        f"#!/bin/sh\necho run >> {calls}\necho 'fatal error: mlx/mlx.h: missing' >&2\nexit 1\n"
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MUSICGEN_MLX_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.library() is None
    assert cpu_kernels.library() is None
    assert calls.read_text() == "run\n"  # compiled once
    marker = cpu_kernels._library_path().with_name(cpu_kernels._library_path().name + ".failed")
    first, again = (r.getMessage() for r in caplog.records)
    assert first == (
        "musicgen CPU kernels unavailable (compiling cpu_kernels.cpp failed: fatal error: "
        "mlx/mlx.h: missing); using MLX's operations"
    )
    assert again == (
        "musicgen CPU kernels unavailable (compiling cpu_kernels.cpp failed: fatal error: "
        f"mlx/mlx.h: missing (earlier; delete {marker} to try again)); using MLX's operations"
    )
    marker.unlink()
    assert cpu_kernels.library() is None and calls.read_text() == "run\nrun\n"


@pytest.mark.parametrize("shape", [(2, 1024), (1, 2, 16), (3, 40)])
def test_layer_norm_is_mlx_layer_norm(kernels, shape):
    """Rows of the step's width, a batched state and a width past a vector (40)."""
    kx, kw, kb = mx.random.split(mx.random.key(shape[-1]), 3)
    x = mx.random.normal(shape, key=kx) * 3 + 1
    weight = mx.random.normal(shape[-1:], key=kw)
    bias = mx.random.normal(shape[-1:], key=kb)
    out = kernels.layer_norm(x, weight, bias, 1e-5)
    assert out.shape == x.shape and out.dtype == mx.float32
    assert rel_err(out, mx.fast.layer_norm(x, weight, bias, 1e-5)) <= 1e-5
    # strided views (a row slice, a transposed state, a weight with a stride): read as they are
    xt = mx.random.normal((shape[-1], 2), key=kx).T
    assert (
        rel_err(
            kernels.layer_norm(xt, weight, bias, 1e-5), mx.fast.layer_norm(xt, weight, bias, 1e-5)
        )
        <= 1e-5
    )
    wide = mx.random.normal((2 * shape[-1],), key=kw)
    assert (
        rel_err(
            kernels.layer_norm(x, wide[::2], bias, 1e-5),
            mx.fast.layer_norm(x, wide[::2], bias, 1e-5),
        )
        <= 1e-5
    )
    with pytest.raises(ValueError, match="float32"):
        kernels.layer_norm(x, weight[:-1], bias, 1e-5)


def test_elu_is_within_1_ulp_of_expm1(kernels):
    """ELU over every float32 range it meets (and the split over both cores, with a masked tail):
    within 1 ulp of float64's expm1, exact for x >= 0 and at -inf-like inputs."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -np.logspace(-38, 2, 200_001),  # tiny to large negatives (past expm1's -1 at ~-17)
            rng.standard_normal(100_000) * 3,
            [0.0, -0.0, 1e-30, 3.5, 1e30, -1e30, -88.0, -89.0, -np.log(2) / 2],
        ]
    ).astype(np.float32)
    out = np.array(kernels.elu(mx.array(x)))
    wide = x.astype(np.float64)
    expected = np.maximum(wide, 0) + np.expm1(np.minimum(wide, 0))
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - expected) / ulp) <= 1  # measured 0.87 (MLX's expm1: 0.75)
    positive = x >= 0
    np.testing.assert_array_equal(out[positive], x[positive])
    # a strided view (copied first) and a shape of EnCodec's: (batch, time, channels)
    y = mx.array(rng.standard_normal((2, 300, 64)).astype(np.float32))[:, ::2]
    np.testing.assert_allclose(
        np.array(kernels.elu(y)), np.array(mx.where(y > 0, y, mx.expm1(y))), rtol=3e-7, atol=1e-38
    )
