"""MusicGen decoder: teacher-forced parity with transformers, KV-cache decoding, weights and config."""

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import text_states

from musicgen import _blas, cpu_kernels, model
from musicgen.generate import with_unconditional_rows
from musicgen.model import (
    MusicgenDecoder,
    MusicgenDecoderConfig,
    _side_stream,
    exp_nonpositive,
    in_pieces,
    linear,
    quantize_decoder,
    quantize_weights,
    single_query_attention,
    sinusoidal_positions,
)

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def mono():
    return MusicgenDecoder.from_pretrained(FIXTURES / "tiny-musicgen")


@pytest.fixture(scope="module")
def teacher_forced():
    return np.load(EXPECTED / "decoder.npz")


def test_teacher_forced_logits_match_transformers(mono, teacher_forced):
    d = teacher_forced
    cross = mono.cross_states(*text_states([0, 1], d["attention_mask"]))
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    logits = mono(tokens, cross)
    assert logits.shape == (2, 4, 8, 2048)
    assert rel_err(logits, d["logits"].reshape(2, 4, 8, -1)) <= 1e-4


def test_incremental_decoding_with_cache_matches_full_forward(mono, teacher_forced):
    d = teacher_forced
    cross = mono.cross_states(*text_states([0, 1], d["attention_mask"]))
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    full = np.array(mono(tokens, cross))
    cache = mono.make_cache(2, 16)
    steps = [np.array(mono(tokens[:, :, i : i + 1], cross, cache, i)) for i in range(8)]
    assert rel_err(np.concatenate(steps, axis=2), full) <= 1e-5
    # a multi-token chunk through the cache, then single steps, gives the same logits too
    cache = mono.make_cache(2, 16)
    chunk = np.array(mono(tokens[:, :, :5], cross, cache, 0))
    rest = [np.array(mono(tokens[:, :, i : i + 1], cross, cache, i)) for i in range(5, 8)]
    assert rel_err(np.concatenate([chunk, *rest], axis=2), full) <= 1e-5


def token_step_logits(decoder, tokens, cross, fold_cross=None, *form) -> np.ndarray:
    """Logits of every position through the generation step (TokenStep), one token at a time;
    `form`: the products' (weight_first, small_product, split_products, kernels)."""
    cache = decoder.make_cache(tokens.shape[0], tokens.shape[-1] + 3)
    step = decoder.token_step(cross, cache, fold_cross, *form)
    logits = [np.array(step(tokens[:, :, i], i)) for i in range(tokens.shape[-1])]
    return np.stack(logits, axis=2)


FOLDS = pytest.mark.parametrize("fold", [False, True], ids=["projections", "folded"])


# (weight_first, small_product, split_products, kernels): x @ W^T whole, W @ x^T, x @ W^T in pieces of
# W's rows (4 rows x 5 x 16, 4 x 2 x 32: uneven pieces of the tiny decoder's 16- and 32-wide weights)
# on one CPU stream, and every other piece on a second one; not the fused CPU kernels (see
# test_token_step_with_cpu_kernels_matches_full_forward)
PRODUCT_FORMS = {
    "x@W^T": (False, 0, False, False),
    "W@x^T": (True, 0, False, False),
    "x@W^T in pieces": (False, 4 * 5 * 16, False, False),
    "x@W^T in pieces, two streams": (False, 4 * 5 * 16, True, False),
}


@FOLDS
@pytest.mark.parametrize("form", list(PRODUCT_FORMS))
def test_token_step_matches_full_forward(mono, teacher_forced, fold, form):
    """The compiled generation step (padded text mask, unconditional all-zero-mask rows), with the
    cross-attention projections applied or folded, the products in each form (MKL's, OpenBLAS' AVX2
    and AVX-512 kernels'), equals the teacher-forced forward, which equals transformers."""
    d = teacher_forced
    states, mask = text_states([0, 1], d["attention_mask"])
    states = mx.concatenate([states, mx.zeros_like(states)])
    mask = mx.concatenate([mask, mx.zeros_like(mask)])
    cross = mono.cross_states(states, mask)
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    tokens = mx.concatenate([tokens, tokens])
    full = np.array(mono(tokens, cross))
    steps = token_step_logits(mono, tokens, cross, fold, *PRODUCT_FORMS[form])
    assert mono.token_step(cross, mono.make_cache(4, 1), fold).text_rows == 2  # CFG: 2 + 2
    assert steps.dtype == np.float32 and steps.shape == full.shape
    assert rel_err(steps, full) <= 1e-5
    assert rel_err(steps[:2], d["logits"].reshape(2, 4, 8, -1)) <= 1e-4
    # no mask at all (None) is the same as an all-ones mask
    ones = mono.cross_states(states[:1], None)
    assert (
        rel_err(token_step_logits(mono, tokens[:1], ones, fold), np.array(mono(tokens[:1], ones)))
        <= 1e-5
    )


def guided_prompt(decoder, d):
    """The fixtures' first prompt as classifier-free guidance runs it: its text row and an
    unconditional row (states, mask, cross state, the teacher-forced tokens of both rows)."""
    states, mask = text_states([0, 1], d["attention_mask"])
    cross = decoder.cross_states(*with_unconditional_rows(states[:1], mask[:1]))
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)[:1]
    return states, mask, cross, mx.concatenate([tokens, tokens])


@FOLDS
def test_token_step_with_cpu_kernels_matches_full_forward(mono, teacher_forced, fold):
    """The step on the fused CPU kernels (one text row and its unconditional row, as classifier-free
    guidance runs a prompt; the text row alone; a batch of 2 with guidance) equals the
    teacher-forced forward."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    assert cpu_kernels.enabled(), "the kernels failed to build or their check against MLX"
    d = teacher_forced
    states, mask, cross, tokens = guided_prompt(mono, d)
    full = np.array(mono(tokens, cross))
    kernels = token_step_logits(mono, tokens, cross, fold, None, None, None, True)
    assert kernels.shape == full.shape and rel_err(kernels, full) <= 1e-5
    assert rel_err(kernels[:1], d["logits"].reshape(2, 4, 8, -1)[:1]) <= 1e-4
    alone = mono.cross_states(states[:1], mask[:1])
    one_row = token_step_logits(mono, tokens[:1], alone, fold, None, None, None, True)
    assert rel_err(one_row, np.array(mono(tokens[:1], alone))) <= 1e-5
    # a batch of 2 with guidance (4 rows: both prompts' text rows, then the unconditional ones)
    states4 = mx.concatenate([states, mx.zeros_like(states)])
    cross4 = mono.cross_states(states4, mx.concatenate([mask, mx.zeros_like(mask)]))
    tokens4 = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    tokens4 = mx.concatenate([tokens4, tokens4])
    four = token_step_logits(mono, tokens4, cross4, fold, None, None, None, True)
    assert rel_err(four, np.array(mono(tokens4, cross4))) <= 1e-5
    # a batch of 3 with guidance (6 rows: two weight rows at a time in the products)
    states3, mask3 = mx.concatenate([states, states[:1]]), mx.concatenate([mask, mask[:1]])
    cross6 = mono.cross_states(
        mx.concatenate([states3, mx.zeros_like(states3)]),
        mx.concatenate([mask3, mx.zeros_like(mask3)]),
    )
    tokens6 = mx.concatenate([tokens4[:2], tokens4[:1]] * 2)
    six = token_step_logits(mono, tokens6, cross6, fold, None, None, None, True)
    assert rel_err(six, np.array(mono(tokens6, cross6))) <= 1e-5
    with pytest.raises(ValueError, match="CPU kernels"):  # 10 rows: batch 5 with guidance
        mono.token_step(cross, mono.make_cache(10, 1), kernels=True)


def test_token_step_over_a_float16_cache(mono, teacher_forced):
    """kv_dtype float16: the cache and the K/V bytes a step reads halve; the step's logits stay
    within float16's rounding of the float32 forward, on the kernels and on MLX's operations."""
    d = teacher_forced
    states, mask, cross, tokens = guided_prompt(mono, d)
    full = np.array(mono(tokens, cross))
    single = mono.token_step(cross, mono.make_cache(2, 11)).bytes_per_step(7)
    mono.kv_dtype = mx.float16
    try:
        half = mono.token_step(cross, mono.make_cache(2, 11)).bytes_per_step(7)
        assert half["weights"] == single["weights"] and 2 * half["kv"] == single["kv"]
        forms = [(None, None, None, False)]
        if cpu_kernels.wanted():
            forms.append((None, None, None, True))
        for form in forms:
            assert rel_err(token_step_logits(mono, tokens, cross, None, *form), full) <= 1e-3
    finally:
        mono.kv_dtype = None


def test_token_step_cuts_its_pieces_once(mono, teacher_forced):
    """With pieces, the step holds each linear weight as its row pieces, cut when it is built: views
    of the weight (the same bytes), the layer norms as they are; `linear` runs the pieces, and the
    logits are those of the whole products."""
    d = teacher_forced
    states, mask, cross, tokens = guided_prompt(mono, d)
    # the tiny decoder's 16-wide weights in pieces of 10 rows, its 32-wide ones in pieces of 5
    limit = 4 * 5 * 16
    step = mono.token_step(cross, mono.make_cache(2, 4), None, False, limit, kernels=False)
    fc1, w = step.layers[0]["fc1"], mono.layers[0].fc1.weight
    assert "weight" not in fc1 and [p.shape for p in fc1["pieces"]] == [(16, 10)] * 3 + [(16, 2)]
    assert mx.array_equal(mx.concatenate([p.T for p in fc1["pieces"]]), w)
    assert all("pieces" in head for head in step.lm_heads)
    assert step.layers[0]["final_layer_norm"].keys() == {"weight", "bias"}
    h = mx.random.normal((2, 16), key=mx.random.key(1))
    assert rel_err(linear(fc1, h), h @ w.T) <= 1e-6
    whole = mono.token_step(cross, mono.make_cache(2, 4), None, False, 0, kernels=False)
    assert "weight" in whole.layers[0]["fc1"]
    assert step.bytes_per_step(3) == whole.bytes_per_step(3)
    for i in range(3):
        assert rel_err(step(tokens[:, :, i], i), whole(tokens[:, :, i], i)) <= 1e-5


def test_in_pieces_leaves_quantized_and_small_weights():
    """Quantized layers, 1-D weights and weights within the limit stay whole."""
    q = {
        "weight": mx.zeros((8, 2), mx.uint32),
        "scales": mx.ones((8, 1)),
        "biases": mx.zeros((8, 1)),
    }
    small, big = {"weight": mx.ones((4, 4))}, {"weight": mx.ones((8, 4)), "bias": mx.ones(8)}
    tree = {
        "q": q,
        "norm": {"weight": mx.ones(64), "bias": mx.zeros(64)},
        "small": small,
        "big": [big],
    }
    out = in_pieces(tree, rows=2, limit=32)
    for name in ("q", "small", "norm"):  # the same arrays, whole
        assert out[name].keys() == tree[name].keys()
        assert all(out[name][k] is v for k, v in tree[name].items())
    assert out["big"][0].keys() == {"pieces", "bias"}
    assert [p.shape for p in out["big"][0]["pieces"]] == [(4, 4), (4, 4)]


@FOLDS
def test_token_step_rows_without_text(mono, teacher_forced, fold):
    """Rows without text between rows with text, or no text at all (unconditional), give the
    forward's logits: a row without text attends to zero states, so its cross-attention is 0."""
    d = teacher_forced
    states, mask = text_states([0, 1], d["attention_mask"])
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    zeros = mx.zeros_like
    mixed = mono.cross_states(
        mx.stack([states[0], zeros(states[0]), states[1], zeros(states[1])]),
        mx.stack([mask[0], zeros(mask[0]), mask[1], zeros(mask[1])]),
    )
    mixed_tokens = mx.concatenate([tokens[:1], tokens[:1], tokens[1:], tokens[1:]])
    empty = mono.cross_states(zeros(states), zeros(mask))
    for cross, batch, text_rows in ((mixed, mixed_tokens, 4), (empty, tokens, 0)):
        full = np.array(mono(batch, cross))
        assert rel_err(token_step_logits(mono, batch, cross, fold), full) <= 1e-5
        step = mono.token_step(cross, mono.make_cache(batch.shape[0], 4), fold)
        assert step.text_rows == text_rows


@pytest.mark.parametrize(
    "blas, chunk, fast_from", [("openblas", 1024, 512), ("openblas", 128, 512), ("mkl", 1024, 64)]
)
def test_token_step_long_cache(mono, teacher_forced, monkeypatch, blas, chunk, fast_from):
    """A long cache (301 positions): without MKL the CPU step runs half the rows on a second stream
    and the scores of more than SCORE_CHUNK keys in chunks (128: 3 chunks); with MKL one stream and,
    from FAST_EXP_FROM keys, the softmax with `exp_nonpositive`. The logits are those of the
    module's forward through the same cache."""
    monkeypatch.setattr(model, "SCORE_CHUNK", chunk)
    monkeypatch.setattr(model, "FAST_EXP_FROM", fast_from)
    monkeypatch.setattr(_blas, "kind", blas)
    d = teacher_forced
    cross = mono.cross_states(*with_unconditional_rows(*text_states([0], d["attention_mask"][:1])))
    n = 300
    tokens = mx.random.randint(0, 2048, (2, 4, n + 1), key=mx.random.key(7))
    cache = mono.make_cache(2, n + 1)
    mono(tokens[:, :, :n], cross, cache, 0)  # prefill positions 0..n-1
    step = mono.token_step(cross, cache)
    assert mx.default_device() == mx.cpu and (_side_stream() is None) == (blas == "mkl")
    logits = step(tokens[:, :, n], n)
    mx.eval(logits)
    # the module's forward, one stream, rewrites position n with the same keys/values
    expected = mono(tokens[:, :, n : n + 1], cross, cache, n)[:, :, 0]
    assert rel_err(logits, expected) <= 1e-5


@pytest.mark.parametrize("fast_exp", [False, True])
@pytest.mark.parametrize("chunk", [None, 7, 50, 64])
def test_single_query_attention_in_chunks(chunk, fast_exp):
    """softmax(q K^T / sqrt(d)) V, the scores whole or `chunk` keys at a time, with MLX's softmax or
    `exp_nonpositive`, equals numpy."""
    q, k, v = (
        4 * mx.random.normal(s, key=mx.random.key(i))
        for i, s in enumerate([(2, 3, 1, 8), (2, 3, 50, 8), (2, 3, 50, 8)])
    )
    out = single_query_attention(q, k, v, 8**-0.5, chunk=chunk, fast_exp=fast_exp)
    s = np.einsum("bhqd,bhkd->bhqk", np.array(q, np.float64), np.array(k, np.float64)) * 8**-0.5
    w = np.exp(s - s.max(-1, keepdims=True))
    expected = (w / w.sum(-1, keepdims=True)) @ np.array(v, np.float64)
    assert out.shape == (2, 3, 1, 8)
    assert rel_err(out, expected) <= 1e-5


def test_exp_nonpositive_is_within_2e_7():
    x = mx.concatenate([mx.linspace(-87.0, 0.0, 200_001), mx.array([-0.0, -1e-30, -1e-6])])
    y = np.array(exp_nonpositive(x), np.float64)
    expected = np.exp(np.array(x, np.float64))
    assert np.max(np.abs(y - expected) / expected) <= 2e-7
    assert y[-3] == 1.0
    below = np.array(exp_nonpositive(mx.array([-88.0, -1000.0, -np.inf])))
    assert np.all((below > 0) & (below <= np.exp(-87.0) * (1 + 1e-6)))  # clamped at exp(-87)
    assert np.isnan(np.array(exp_nonpositive(mx.array([np.nan])))).all()


def test_token_step_folds_when_it_reads_fewer_bytes(mono, teacher_forced):
    """Folding is chosen by bytes (rows with text x heads x text length < width), and bytes_per_step
    counts exactly what the step reads."""
    d = teacher_forced
    states, mask = text_states([0, 1], d["attention_mask"])
    c = mono.config
    layers, dims, heads, text = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, 8
    states, mask = states[:, :text], mask[:, :text]
    cfg = mono.cross_states(
        mx.concatenate([states[:1], mx.zeros_like(states[:1])]),
        mx.concatenate([mask[:1], mx.zeros_like(mask[:1])]),
    )
    cache = mono.make_cache(2, 4)
    unfolded = mono.token_step(cfg, cache, False).bytes_per_step(9)
    folded = mono.token_step(cfg, cache, True).bytes_per_step(9)
    assert unfolded["kv"] == folded["kv"] == 2 * layers * 2 * dims * 4 * 10
    projections = 2 * dims * dims * 4  # q_proj + out_proj
    text_kv = 2 * text * dims * 4  # the text's keys and values, 1 row with text
    folded_mats = 2 * heads * text * dims * 4
    assert unfolded["weights"] - folded["weights"] == layers * (projections + text_kv - folded_mats)
    assert unfolded["total"] == unfolded["weights"] + unfolded["kv"]
    # auto: 1 row x 2 heads x 8 tokens = 16 is not < 16 = width x width / width
    assert not mono.token_step(cfg, cache).fold_cross
    short = mono.cross_states(
        mx.concatenate([states[:1, :7], mx.zeros_like(states[:1, :7])]),
        mx.concatenate([mask[:1, :7], mx.zeros_like(mask[:1, :7])]),
    )
    assert mono.token_step(short, cache).fold_cross


def test_cache_is_preallocated_and_written_in_place(mono):
    cache = mono.make_cache(3, 10)
    c = mono.config
    assert len(cache) == c.num_hidden_layers
    assert cache[0].keys.shape == (
        3,
        c.num_attention_heads,
        10,
        c.hidden_size // c.num_attention_heads,
    )
    k = mx.ones((3, c.num_attention_heads, 1, c.hidden_size // c.num_attention_heads))
    keys, values = cache[0].update(k, 2 * k, mx.array([4], dtype=mx.int32))
    assert keys.shape == (3, c.num_attention_heads, 10, k.shape[-1])
    written = np.array(keys)[:, :, :, 0]
    assert (written[:, :, 4] == 1).all() and (np.delete(written, 4, axis=2) == 0).all()
    assert (np.array(values)[:, :, 4] == 2).all()


def test_unconditional_rows_get_zero_cross_attention(mono):
    """All-zero encoder mask (CFG's null condition): finite, exactly zero cross-attention output."""
    states = mx.random.normal((2, 5, 32), key=mx.random.key(0))
    mask = mx.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    cross = mono.cross_states(states, mask)
    layer = mono.layers[0].encoder_attn
    x = mx.random.normal((2, 1, mono.config.hidden_size), key=mx.random.key(1))
    out = np.array(layer.attend(x, *cross.kv[0], cross.mask))
    assert np.isfinite(out).all()
    assert (out[1] == 0).all() and np.abs(out[0]).max() > 0
    tokens = mx.full((2, 4, 1), 2048, dtype=mx.int32)
    assert np.isfinite(np.array(mono(tokens, cross))).all()


def test_positions_are_cos_then_sin():
    table = np.array(sinusoidal_positions(50, 16))
    half = 8
    freqs = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    angles = np.arange(50)[:, None] * freqs[None]
    np.testing.assert_allclose(table[:, :half], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(table[:, half:], np.sin(angles), atol=1e-5)
    assert table[0, :half].tolist() == [1.0] * half and table[0, half:].tolist() == [0.0] * half
    assert sinusoidal_positions(4, 7).shape == (4, 7)


def test_config_from_composite_and_subconfig():
    composite = json.loads((FIXTURES / "tiny-musicgen" / "config.json").read_text())
    config = MusicgenDecoderConfig.from_dict(composite)
    assert (config.hidden_size, config.num_hidden_layers, config.num_codebooks) == (16, 2, 4)
    assert config.encoder_hidden_size == 32 and config.has_enc_to_dec_proj
    assert config.delays == [0, 1, 2, 3]
    sub = MusicgenDecoderConfig.from_dict({**composite["decoder"], "some_future_key": 1})
    assert sub.encoder_hidden_size is None and not sub.has_enc_to_dec_proj
    stereo = MusicgenDecoderConfig.from_dict({"num_codebooks": 8, "audio_channels": 2})
    assert stereo.delays == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sanitize_maps_hugging_face_names(mono):
    w = mx.zeros((2,))
    names = {
        "model.decoder.embed_tokens.0.weight": "embed_tokens.0.weight",
        "model.decoder.layers.1.self_attn.q_proj.weight": "layers.1.self_attn.q_proj.weight",
        "model.decoder.layers.0.encoder_attn_layer_norm.bias": "layers.0.encoder_attn_layer_norm.bias",
        "model.decoder.layers.0.fc1.weight": "layers.0.fc1.weight",
        "model.decoder.layer_norm.weight": "layer_norm.weight",
        "lm_heads.3.weight": "lm_heads.3.weight",
        "enc_to_dec_proj.bias": "enc_to_dec_proj.bias",
    }
    out = MusicgenDecoder.sanitize(
        {**dict.fromkeys(names, w), "model.decoder.embed_positions.weights": w}
    )
    assert sorted(out) == sorted(names.values())
    # every parameter of the module is covered by a Hugging Face name
    hf = MusicgenDecoder.sanitize(
        {
            k.removeprefix("decoder."): v
            for k, v in mx.load(str(FIXTURES / "tiny-musicgen" / "model.safetensors")).items()
            if k.startswith(("decoder.", "enc_to_dec_proj."))
        }
    )
    from mlx.utils import tree_flatten

    assert sorted(hf) == sorted(k for k, _ in tree_flatten(mono.parameters()))


def test_float16_decoder_stays_close(teacher_forced):
    d = teacher_forced
    half = MusicgenDecoder.from_pretrained(FIXTURES / "tiny-musicgen", dtype=mx.float16)
    assert half.layers[0].fc1.weight.dtype == mx.float16
    cross = half.cross_states(*text_states([0, 1], d["attention_mask"]))
    logits = half(mx.array(d["decoder_input_ids"]).reshape(2, 4, -1), cross)
    assert rel_err(logits.astype(mx.float32), d["logits"].reshape(2, 4, 8, -1)) <= 2e-2
    tokens = mx.array(d["decoder_input_ids"]).reshape(2, 4, -1)
    for fold in (False, True):
        step = token_step_logits(half, tokens, cross, fold)
        assert rel_err(step, logits.astype(mx.float32)) <= 1e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_step_on_the_cpu_kernels(bits):
    """A quantized decoder's step on the CPU kernels (8 and 4 bits, groups of 64: with the
    cross-attention folded, the fused layers; with it projected, the products alone) against MLX's
    quantized_matmul and the module forward, for 1 row and for a guided pair (2 rows)."""
    if not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    config = MusicgenDecoderConfig(
        hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=2,
        encoder_hidden_size=64,
    )  # fmt: skip
    mx.random.seed(1)
    decoder = quantize_decoder(MusicgenDecoder(config), bits)
    states = mx.random.normal((2, 5, 64), key=mx.random.key(4))
    mask = mx.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=mx.int32)
    tokens = mx.random.randint(0, 2048, (2, 4, 6), key=mx.random.key(5))
    for rows in (1, 2):
        cross = decoder.cross_states(states[:rows], mask[:rows])
        full = np.array(decoder(tokens[:rows], cross))
        for fold in (False, True):
            on_kernels = token_step_logits(
                decoder, tokens[:rows], cross, fold, None, None, None, None
            )
            on_mlx = token_step_logits(decoder, tokens[:rows], cross, fold, None, None, None, False)
            assert rel_err(on_kernels, full) <= 1e-5 and rel_err(on_kernels, on_mlx) <= 1e-5
        step = decoder.token_step(cross, decoder.make_cache(rows, 1))
        assert step.kernels is not None and step.fold_cross and step.on_kernels  # fused layers
        projected = decoder.token_step(cross, decoder.make_cache(rows, 1), fold_cross=False)
        assert projected.kernels is None and projected.on_kernels  # the quantized products only
    with pytest.raises(ValueError, match="the cross-attention folded"):
        decoder.token_step(cross, decoder.make_cache(2, 1), fold_cross=False, kernels=True)


def test_quantized_decoder_stays_close():
    config = MusicgenDecoderConfig(
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=64,
    )
    mx.random.seed(0)
    decoder = MusicgenDecoder(config)
    states, mask = (
        mx.random.normal((1, 5, 64), key=mx.random.key(2)),
        mx.ones((1, 5), dtype=mx.int32),
    )
    tokens = mx.random.randint(0, 2048, (1, 4, 6), key=mx.random.key(3))
    ref = decoder(tokens, decoder.cross_states(states, mask))
    from mlx.utils import tree_flatten

    # the conversion-cache path: quantized weights loaded into a decoder quantized to match
    stored = quantize_weights(dict(tree_flatten(decoder.parameters())), bits=8)
    assert "layers.0.fc1.scales" in stored and "embed_tokens.0.scales" not in stored
    loaded = quantize_decoder(MusicgenDecoder(config), 8, only=stored)
    loaded.load_weights(list(stored.items()), strict=True)
    quantize_decoder(decoder, 8)
    assert type(decoder.layers[0].fc1).__name__ == "QuantizedLinear"
    out = decoder(tokens, decoder.cross_states(states, mask))
    assert rel_err(out, ref) <= 2e-2
    assert rel_err(loaded(tokens, loaded.cross_states(states, mask)), out) <= 1e-6
    # the generation step runs the quantized layers too (and reports what they are)
    assert (decoder.quant_group_size, decoder.quant_bits) == (64, 8)
    cross = decoder.cross_states(states, mask)
    for fold in (False, True):
        assert rel_err(token_step_logits(decoder, tokens, cross, fold), out) <= 1e-5
    with pytest.raises(ValueError):
        quantize_decoder(decoder, 3)
