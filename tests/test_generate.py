"""Generation: delay pattern, sampling, the loop; greedy CFG tokens equal transformers' exactly."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import text_states

from musicgen import cpu_kernels
from musicgen.generate import (
    build_delay_pattern,
    delay_valid_mask,
    generate_tokens,
    num_frames,
    sample,
    steps_for_duration,
    undo_delay_pattern,
)
from musicgen.model import MusicgenDecoder

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"
MONO = [0, 1, 2, 3]
STEREO = [0, 0, 1, 1, 2, 2, 3, 3]


def alone(i: int) -> tuple[mx.array, mx.array]:
    n = np.load(EXPECTED / "t5.npz")[f"hidden_{i}"].shape[1]
    return text_states([i], np.ones((1, n), np.int32))


@pytest.fixture(scope="module")
def mono():
    return MusicgenDecoder.from_pretrained(FIXTURES / "tiny-musicgen")


@pytest.fixture(scope="module")
def expected():
    return np.load(EXPECTED / "generate.npz")


# --- delay pattern -------------------------------------------------------------------------------


@pytest.mark.parametrize("delays", [MONO, STEREO, [0, 2, 1]])
def test_delay_pattern_round_trip(delays):
    codes = mx.array(
        np.random.default_rng(0).integers(0, 2048, (2, len(delays), 7)), dtype=mx.int32
    )
    delayed = build_delay_pattern(codes, delays, 2048)
    assert delayed.shape == (2, len(delays), 7 + max(delays))
    d = np.array(delayed)
    for q, shift in enumerate(delays):
        assert (d[:, q, :shift] == 2048).all() and (d[:, q, shift + 7 :] == 2048).all()
        assert (d[:, q, shift : shift + 7] == np.array(codes)[:, q]).all()
    assert (np.array(undo_delay_pattern(delayed, delays)) == np.array(codes)).all()


def test_delay_pattern_mask_matches_transformers_layout():
    """4 codebooks, 8 positions (bos + 7 steps): transformers' docstring pattern, bos column dropped."""
    valid = np.array(delay_valid_mask(7, MONO)).T
    expected = [
        [1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1],
    ]
    assert valid.astype(int).tolist() == expected
    stereo = np.array(delay_valid_mask(7, STEREO)).T.astype(int)
    assert stereo[0::2].tolist() == expected and stereo[1::2].tolist() == expected


def test_step_and_frame_counts():
    assert (
        num_frames(300, MONO) == 297 and num_frames(40, MONO) == 37 and num_frames(30, STEREO) == 27
    )
    assert steps_for_duration(8.0, 50, MONO) == 403
    assert steps_for_duration(0.5, 50, STEREO) == 28
    assert num_frames(steps_for_duration(30.0, 50, MONO), MONO) == 1500


# --- sampling ------------------------------------------------------------------------------------


def fixed_logits(rows: int = 4000, vocab: int = 64) -> np.ndarray:
    base = np.random.default_rng(1).normal(0, 2.0, vocab).astype(np.float32)
    return np.tile(base, (rows, 1))


def test_top_k_never_leaves_the_k_best():
    logits = fixed_logits()
    drawn = np.array(sample(mx.array(logits), mx.random.key(3), top_k=5))
    best = set(np.argsort(-logits[0])[:5].tolist())
    assert set(drawn.tolist()) == best  # 4000 draws: every one of the 5 shows up, nothing else


def test_top_p_keeps_the_nucleus_only():
    logits = fixed_logits()
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    ascending = np.argsort(probs)  # transformers: drop tokens whose ascending cumsum <= 1 - top_p
    removed = np.cumsum(probs[ascending]) <= 1 - 0.6
    removed[-1] = False
    nucleus = set(ascending[~removed].tolist())
    order = ascending[::-1]
    assert 1 < len(nucleus) < 20
    drawn = np.array(sample(mx.array(logits), mx.random.key(4), top_k=0, top_p=0.6))
    assert set(drawn.tolist()) == nucleus
    # top-k then top-p (transformers' order): the nucleus of the k best
    drawn = np.array(sample(mx.array(logits), mx.random.key(5), top_k=2, top_p=0.99))
    assert set(drawn.tolist()) == set(order[:2].tolist())


def test_greedy_and_temperature():
    logits = mx.array(fixed_logits(rows=3))
    argmax = np.array(mx.argmax(logits, axis=-1))
    assert (np.array(sample(logits, None, top_k=1)) == argmax).all()
    assert (np.array(sample(logits, mx.random.key(0), temperature=0.0)) == argmax).all()
    cold = np.array(sample(mx.array(fixed_logits()), mx.random.key(6), top_k=0, temperature=1e-3))
    assert (cold == argmax[0]).all()
    assert sample(logits, mx.random.key(0)).dtype == mx.int32


def test_sampling_follows_the_distribution():
    logits = mx.array(np.tile(np.log(np.array([0.5, 0.3, 0.2], np.float32)), (20000, 1)))
    drawn = np.array(sample(logits, mx.random.key(7), top_k=0))
    freq = np.bincount(drawn, minlength=3) / drawn.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.02)


# --- the generation loop -------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu kernels", "mlx operations"])
def test_greedy_cfg_batch_matches_transformers(mono, expected, kernels, monkeypatch):
    """A batch of 2 with guidance (4 rows): on the fused CPU kernels where they run, and on MLX's
    operations (the step on other machines)."""
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    states, mask = text_states([0, 1], expected["batch_attention_mask"])
    tokens = generate_tokens(mono, states, mask, 40, top_k=1, guidance_coef=3.0, progress=False)
    assert tokens.shape == (2, 4, 37) and tokens.dtype == mx.int32
    assert (np.array(tokens) == expected["batch_tokens"]).all()


def test_greedy_cfg_single_and_long_match_transformers(mono, expected):
    tokens = generate_tokens(mono, *alone(0), 40, top_k=1, guidance_coef=3.0, progress=False)
    assert (np.array(tokens) == expected["single_tokens"]).all()
    tokens = generate_tokens(mono, *alone(1), 253, top_k=1, guidance_coef=3.0, progress=False)
    assert tokens.shape == (1, 4, 250)
    assert (np.array(tokens) == expected["long_tokens"]).all()


def test_no_guidance_runs_a_single_batch(mono):
    tokens = generate_tokens(mono, *alone(0), 12, top_k=1, guidance_coef=1.0, progress=False)
    assert tokens.shape == (1, 4, 9)


def test_seeds_reproduce_and_differ(mono):
    states, mask = alone(2)
    a = generate_tokens(mono, states, mask, 30, seed=11, progress=False)
    b = generate_tokens(mono, states, mask, 30, seed=11, progress=False)
    c = generate_tokens(mono, states, mask, 30, seed=12, progress=False)
    assert (np.array(a) == np.array(b)).all()
    assert (np.array(a) != np.array(c)).any()
    assert np.array(a).max() < 2048 and np.array(a).min() >= 0


def guided_logits(decoder, states, mask, tokens, guidance_coef):
    """Teacher forcing: the guided logits (batch, codebooks, steps, vocab) that each generation step saw.

    The generated codes are put back into the delay pattern; step s read bos + the delayed tokens before
    s, so one full causal forward (no cache) over both CFG halves recomputes every step's logits.
    """
    c = decoder.config
    delayed = build_delay_pattern(tokens, c.delays, c.pad_token_id)
    b, k, _ = delayed.shape
    bos = mx.full((b, k, 1), c.bos_token_id, dtype=mx.int32)
    inputs = mx.concatenate([bos, delayed[..., :-1]], axis=-1)
    cross = decoder.cross_states(
        mx.concatenate([states, mx.zeros_like(states)]), mx.concatenate([mask, mx.zeros_like(mask)])
    )
    logits = decoder(mx.concatenate([inputs, inputs]), cross).astype(mx.float32)
    guided = logits[b:] + guidance_coef * (logits[:b] - logits[b:])
    return np.array(guided, np.float64), np.array(delayed)


def sampled_steps(decoder, states, mask, steps, temperature, **sampling):
    """Generate with CFG 3, then yield (tempered guided logits, drawn token) of every real token."""
    tokens = generate_tokens(
        decoder,
        states,
        mask,
        steps,
        guidance_coef=3.0,
        temperature=temperature,
        seed=1,
        progress=False,
        **sampling,
    )
    logits, delayed = guided_logits(decoder, states, mask, tokens, 3.0)
    valid = np.array(delay_valid_mask(steps, decoder.config.delays))  # (steps, codebooks)
    for row in range(delayed.shape[0]):
        for s, q in np.argwhere(valid):
            yield logits[row, q, s] / temperature, int(delayed[row, q, s])


def test_top_k_generation_only_emits_the_k_best_of_each_step(mono, expected):
    """top_k=5 at temperature 3 (without the cut, ~15% of these draws fall outside the 5 best)."""
    states, mask = text_states([0, 1], expected["batch_attention_mask"])
    ranks = []
    for logits, token in sampled_steps(mono, states, mask, 40, 3.0, top_k=5):
        tol = 1e-4 * np.abs(logits).max()  # full forward vs cached steps: float32 rounding
        ranks.append(int((logits > logits[token] + tol).sum()))  # tokens clearly better than it
    assert len(ranks) == 2 * 4 * 37
    assert max(ranks) < 5
    assert np.bincount(ranks, minlength=5)[1:].sum() > 20  # really sampled, not greedy


def test_top_p_generation_only_emits_the_nucleus_of_each_step(mono, expected):
    """top_p=0.8 at temperature 2: each token's strictly more likely tokens hold < 80% of the mass."""
    states, mask = text_states([0, 1], expected["batch_attention_mask"])
    before, ranks = [], []
    for logits, token in sampled_steps(mono, states, mask, 40, 2.0, top_k=0, top_p=0.8):
        tol = 1e-4 * np.abs(logits).max()
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        better = logits > logits[token] + tol
        before.append(float(probs[better].sum()))
        ranks.append(int(better.sum()))
    assert len(before) == 2 * 4 * 37
    assert max(before) < 0.8
    assert sum(r > 0 for r in ranks) > 20  # really sampled, not greedy


def test_callback_progress_and_interrupt_leave_no_state(mono, expected):
    seen = []
    states, mask = alone(0)
    generate_tokens(
        mono, states, mask, 10, top_k=1, progress=False, callback=lambda s, t: seen.append((s, t))
    )
    assert seen == [(s, 10) for s in range(1, 11)]

    def stop(step, total):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_tokens(mono, states, mask, 40, top_k=1, progress=False, callback=stop)
    tokens = generate_tokens(mono, states, mask, 40, top_k=1, guidance_coef=3.0, progress=False)
    assert (np.array(tokens) == expected["single_tokens"]).all()


def test_step_limits(mono):
    states, mask = alone(0)
    with pytest.raises(ValueError):
        generate_tokens(mono, states, mask, 3, progress=False)
    with pytest.raises(ValueError):
        generate_tokens(mono, states, mask, mono.config.max_position_embeddings + 1, progress=False)


def test_a_float16_kv_cache_keeps_the_greedy_tokens(mono, expected):
    """The K/V cache in float16 (kv_dtype): half its bytes, and with the fixtures' wide margins the
    same greedy tokens as transformers' float32, for one prompt and a batch of 2 with guidance (2 and
    4 rows; through the CPU kernels where they run)."""
    mono.kv_dtype = mx.float16
    try:
        cache = mono.make_cache(2, 8)
        assert cache[0].keys.dtype == mx.float16 and cache[0].values.dtype == mx.float16
        tokens = generate_tokens(mono, *alone(1), 253, top_k=1, guidance_coef=3.0, progress=False)
        assert (np.array(tokens) == expected["long_tokens"]).all()
        states, mask = text_states([0, 1], expected["batch_attention_mask"])
        tokens = generate_tokens(mono, states, mask, 40, top_k=1, guidance_coef=3.0, progress=False)
        assert (np.array(tokens) == expected["batch_tokens"]).all()
    finally:
        mono.kv_dtype = None
    assert mono.make_cache(2, 8)[0].keys.dtype == mx.float32
