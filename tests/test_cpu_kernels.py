"""The fused CPU kernels (musicgen/csrc/cpu_kernels.cpp) against MLX's own operations."""

import mlx.core as mx
import numpy as np
import pytest

from musicgen import cpu_kernels
from musicgen.model import single_query_attention


@pytest.fixture
def kernels():
    """The compiled kernels (built on the first use, in the test's cache)."""
    loaded = cpu_kernels.load()
    if loaded is None:
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    return loaded


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (rows, out, in): both row counts; out not a multiple of 4 (the one-row tail) and in not a multiple
# of 16 (the masked tail); large enough (out x in >= 2^16) to split over the helper thread
@pytest.mark.parametrize(
    "shape", [(1, 7, 5), (2, 37, 40), (2, 4096, 1024), (1, 1027, 1000), (2, 2048, 1024)]
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
    with pytest.raises(ValueError, match="at most 2 rows"):
        kernels.few_row_product(mx.zeros((3, 16)), w)
    with pytest.raises(ValueError, match="float32"):
        kernels.few_row_product(mx.zeros((2, 16), mx.float16), w)
    with pytest.raises(ValueError, match="float32"):
        kernels.few_row_product(mx.zeros((2, 15)), w)


# (batch, heads, length, head_dim): one position; a length past a vector's 16 (masked tail);
# head_dim 8 (the tiny fixture), 64 (MusicGen) and 72 (a masked tail); the long cache, split over
# the helper thread
@pytest.mark.parametrize("kv_dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "shape", [(2, 2, 1, 8), (2, 2, 19, 8), (1, 3, 50, 72), (2, 16, 100, 64), (2, 16, 1450, 64)]
)
def test_cached_attention_is_softmax_attention(kernels, shape, kv_dtype):
    """Over the filled part of a preallocated cache (a strided view, as the step passes it), in
    float32 or float16 (against float64 of the same float16 values)."""
    batch, heads, length, head_dim = shape
    kq, kk, kv = mx.random.split(mx.random.key(length), 3)
    cache = (batch, heads, length + 7, head_dim)
    keys = mx.random.normal(cache, key=kk).astype(kv_dtype)[:, :, :length]
    values = mx.random.normal(cache, key=kv).astype(kv_dtype)[:, :, :length]
    q = mx.random.normal((batch, heads, 1, head_dim), key=kq) * head_dim**-0.5
    if heads > 1:  # a query with its heads strided, as a (batch, 1, heads, d) state transposed
        q = mx.random.normal((batch, 1, heads, head_dim), key=kq).swapaxes(1, 2) * head_dim**-0.5
    out = kernels.cached_attention(q, keys, values)
    assert out.shape == q.shape and out.dtype == mx.float32
    scores = np.array(q, np.float64) @ np.array(keys, np.float64).swapaxes(-1, -2)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ np.array(values, np.float64)
    assert rel_err(out, expected) <= 1e-5
    # MLX's own path multiplies float16 values by float16 weights: within float16's rounding
    mlx_tolerance = 1e-5 if kv_dtype == mx.float32 else 2e-3
    assert rel_err(out, single_query_attention(q, keys, values)) <= mlx_tolerance


def test_cached_attention_of_large_scores(kernels):
    """Scores far apart (exp underflows to 0 for all but the top key) and equal (a plain mean)."""
    keys = mx.concatenate([mx.full((1, 1, 1, 16), 10.0), mx.full((1, 1, 30, 16), -10.0)], axis=2)
    values = mx.random.normal((1, 1, 31, 16), key=mx.random.key(3))
    out = kernels.cached_attention(mx.ones((1, 1, 1, 16)), keys, values)
    assert rel_err(out, values[:, :, :1]) <= 1e-6
    out = kernels.cached_attention(mx.zeros((1, 1, 1, 16)), keys, values)
    assert rel_err(out, values.mean(axis=2, keepdims=True)) <= 1e-6


def test_cached_attention_rejects_what_it_does_not_run(kernels):
    kv = mx.zeros((1, 2, 5, 16))
    with pytest.raises(ValueError, match="float32"):
        kernels.cached_attention(mx.zeros((1, 2, 1, 16)), kv.astype(mx.float16), kv)
    with pytest.raises(ValueError, match="float32"):
        kernels.cached_attention(
            *[mx.zeros((1, 2, 1, 16))] * 1, kv.astype(mx.bfloat16), kv.astype(mx.bfloat16)
        )
    with pytest.raises(ValueError, match="float32"):
        kernels.cached_attention(mx.zeros((1, 2, 2, 16)), kv, kv)  # two queries
    with pytest.raises(ValueError, match="head_dim <= 256"):
        kernels.cached_attention(mx.zeros((1, 1, 1, 264)), *[mx.zeros((1, 1, 3, 264))] * 2)


def test_the_kernels_build_into_the_cache_once(kernels, monkeypatch):
    """Into an empty cache: one library named by its source, toolchain and CPU, written whole (no
    temporary left), and not built again; MUSICGEN_MLX_KERNELS=0 keeps MLX's operations."""
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
