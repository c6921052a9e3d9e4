"""Generation modes: batches, audio-prompt continuation, unconditional, stereo, and the sliding window."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import musicgen.generate as gen
from musicgen import MusicGen
from musicgen.generate import sliding_windows

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"
PROMPTS = json.loads((EXPECTED / "prompts.json").read_text())
GREEDY = {"top_k": 1, "guidance_coef": 3.0}
LONG = {"window_duration": 2.0, "extend_stride": 1.2}  # 100-frame windows, 60-frame stride


@pytest.fixture(scope="module")
def model():
    return MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", progress=False)


@pytest.fixture(scope="module")
def stereo():
    return MusicGen.from_pretrained(FIXTURES / "tiny-musicgen-stereo", progress=False)


@pytest.fixture(scope="module")
def cont():
    return np.load(EXPECTED / "continuation.npz")


def tone(freq: float, samples: int = 16000) -> np.ndarray:
    t = np.arange(samples) / 32000
    return (0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-3 * t)).astype(np.float32)


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool((a == b).all())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- batches ---------------------------------------------------------------------------------------


def test_each_batch_row_equals_its_prompt_alone(model):
    """4 padded prompts (masks respected in T5 and cross-attention) = 4 separate generations."""
    batch = model.generate_tokens(PROMPTS, max_steps=40, **GREEDY)
    assert batch.shape == (4, 4, 37)
    for i, prompt in enumerate(PROMPTS):
        assert same(batch[i : i + 1], model.generate_tokens(prompt, max_steps=40, **GREEDY)), i
    single = np.load(EXPECTED / "generate.npz")["single_tokens"]  # transformers, PROMPTS[0] alone
    assert same(batch[:1], single)


def test_sampled_batch_is_reproducible_with_a_seed(model):
    a = model.generate_tokens(PROMPTS[:3], max_steps=30, seed=11)
    b = model.generate_tokens(PROMPTS[:3], max_steps=30, seed=11)
    c = model.generate_tokens(PROMPTS[:3], max_steps=30, seed=12)
    assert same(a, b) and not same(a, c)
    assert not same(a[0], a[1])  # rows draw their own samples


# --- audio-prompt continuation ---------------------------------------------------------------------


def test_continuation_matches_transformers(model, cont):
    """transformers generate(input_values=..., do_sample=False, guidance_scale=3, max_new_tokens=20)."""
    audio = cont["prompt_audio"][0, 0]  # (16000,) = 25 frames
    assert same(model.encode_audio(audio), cont["prompt_codes"])
    tokens = model.generate_tokens(PROMPTS[0], 20, audio_prompt=audio, **GREEDY)
    assert tokens.shape == (1, 4, 25 + 20 - 3)
    assert same(tokens, cont["tokens"])  # the prompt's frames first, then 17 new
    for shaped in (audio[:, None], audio[None, :, None], np.stack([audio, audio], 1)):
        # (samples, 1), (1, samples, 1), and a stereo file mixed down to mono
        assert same(model.generate_tokens(PROMPTS[0], 20, audio_prompt=shaped, **GREEDY), tokens)
    new = model.generate_tokens(PROMPTS[0], 20, audio_prompt=audio, include_prompt=False, **GREEDY)
    assert same(new, cont["tokens"][..., 25:])
    wav = model.generate(PROMPTS[0], 20, audio_prompt=audio, **GREEDY)
    assert wav.shape == (42 * 640, 1)
    assert rel_err(wav, cont["audio"][0].T) <= 1e-4
    assert model.generate(PROMPTS[0], 20, audio_prompt=audio[None, :, None], **GREEDY).ndim == 3


def test_continuation_duration_counts_new_audio_and_limits(model, cont):
    audio = cont["prompt_audio"][0, 0]
    tokens = model.generate_tokens(PROMPTS[0], duration=0.34, audio_prompt=audio, **GREEDY)
    assert same(tokens, cont["tokens"])  # 25 prompt frames + 17 new ones (20 steps)
    with pytest.raises(ValueError, match="prompt \\+ max_steps"):
        model.generate_tokens(PROMPTS[0], model.max_steps - 10, audio_prompt=audio)


def test_batched_continuation_broadcasts_text_and_audio(model):
    """(batch, samples, 1) prompts pair with the texts; one audio prompt is shared by every text."""
    left, right = tone(440), tone(660)
    both = model.generate_tokens(
        PROMPTS[:2], 12, audio_prompt=np.stack([left, right])[..., None], **GREEDY
    )
    assert both.shape == (2, 4, 25 + 9)
    for i, (prompt, audio) in enumerate([(PROMPTS[0], left), (PROMPTS[1], right)]):
        assert same(
            both[i : i + 1], model.generate_tokens(prompt, 12, audio_prompt=audio, **GREEDY)
        )
    shared = model.generate_tokens(PROMPTS[:2], 12, audio_prompt=left, **GREEDY)
    assert same(shared[:1], both[:1])
    with pytest.raises(ValueError, match="audio prompts"):
        model.generate_tokens(PROMPTS[:2], 12, audio_prompt=np.zeros((3, 640, 1), np.float32))


def test_unconditional_rows(model):
    """No text = transformers' get_unconditional_inputs: zero states, zero mask, guidance 1."""
    audio = tone(440)
    alone = model.generate_tokens(None, 20, top_k=1, audio_prompt=audio)
    assert alone.shape == (1, 4, 42) and same(alone[..., :25], model.encode_audio(audio))
    assert same(model.generate_tokens("", 20, top_k=1, audio_prompt=audio), alone)
    # an empty prompt in a batch with CFG: its conditional row equals the unconditional one
    mixed = model.generate_tokens(["", PROMPTS[0]], 20, audio_prompt=audio, **GREEDY)
    assert same(mixed[:1], alone)
    assert same(mixed[1:], model.generate_tokens(PROMPTS[0], 20, audio_prompt=audio, **GREEDY))
    free = model.generate_tokens([None, None], 20, top_k=1)
    assert free.shape == (2, 4, 17) and same(free[0], free[1])


# --- stereo ----------------------------------------------------------------------------------------


def test_stereo_continuation_encodes_each_channel(stereo):
    """transformers encodes left and right separately and interleaves codebooks L0 R0 L1 R1 ..."""
    left, right = tone(440), tone(660)
    codes = stereo.encode_audio(np.stack([left, right], 1))
    assert codes.shape == (1, 8, 25)
    assert same(codes[:, 0::2], stereo.audio_encoder.encode(mx.array(left)[None, :, None]))
    assert same(codes[:, 1::2], stereo.audio_encoder.encode(mx.array(right)[None, :, None]))
    tokens = stereo.generate_tokens(
        PROMPTS[0], 20, audio_prompt=np.stack([left, right], 1), **GREEDY
    )
    assert tokens.shape == (1, 8, 42) and same(tokens[..., :25], codes)
    dual = stereo.generate_tokens(PROMPTS[0], 20, audio_prompt=left, **GREEDY)  # mono -> L = R
    assert same(dual[:, 0::2, :25], dual[:, 1::2, :25])
    assert stereo.generate(PROMPTS[0], 20, audio_prompt=left, **GREEDY).shape == (42 * 640, 2)


def test_stereo_continuation_matches_transformers(stereo):
    """A stereo prompt (440 Hz left, 660 Hz right) continued by the stereo model: transformers' tokens
    and audio."""
    modes = np.load(EXPECTED / "modes.npz")
    prompt = np.stack([modes["left"], modes["right"]], 1)
    tokens = stereo.generate_tokens(PROMPTS[0], 20, audio_prompt=prompt, **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), modes["stereo_tokens"])
    audio = stereo.decode_tokens(tokens)
    assert rel_err(audio, modes["stereo_audio"].transpose(0, 2, 1)) <= 1e-4


def test_batched_continuation_matches_transformers(model):
    """Two prompts of different lengths (padded) continuing two audio prompts, in one batch."""
    modes = np.load(EXPECTED / "modes.npz")
    prompts = np.stack([modes["left"], modes["right"]])[..., None]
    tokens = model.generate_tokens(PROMPTS[:2], 12, audio_prompt=prompts, **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), modes["batch_tokens"])
    audio = model.decode_tokens(tokens)
    assert rel_err(audio, modes["batch_audio"].transpose(0, 2, 1)) <= 1e-4


# --- longer than the window ------------------------------------------------------------------------


def test_sliding_window_plan():
    assert sliding_windows(150, 0, 100, 60) == [(0, 0, 100), (60, 40, 90)]
    assert sliding_windows(100, 0, 100, 60) == [(0, 0, 100)]
    assert sliding_windows(175, 25, 100, 60) == [(0, 25, 100), (60, 40, 100), (120, 40, 55)]
    plan = sliding_windows(120 * 50, 0, 30 * 50, 18 * 50)  # 120 s with audiocraft's defaults
    assert [o for o, _, _ in plan] == [0, 900, 1800, 2700, 3600, 4500]
    assert [c for _, c, _ in plan] == [0] + [600] * 5
    assert all(length <= 1500 for _, _, length in plan)
    assert sum(length - c for _, c, length in plan) == 6000
    with pytest.raises(ValueError):
        sliding_windows(300, 0, 100, 100)
    with pytest.raises(ValueError):
        sliding_windows(300, 100, 100, 60)


def capture_windows(monkeypatch) -> list[tuple]:
    """Record (prompt, max_steps, output, cache length) of each window generate_long runs."""
    calls = []
    inner = gen.generate_tokens

    def spy(decoder, states, mask, max_steps, *, prompt=None, **kwargs):
        out = inner(decoder, states, mask, max_steps, prompt=prompt, **kwargs)
        calls.append((None if prompt is None else np.array(prompt), max_steps, np.array(out)))
        return out

    monkeypatch.setattr(gen, "generate_tokens", spy)
    return calls


def test_long_generation_stitches_windows_exactly(model, monkeypatch):
    calls = capture_windows(monkeypatch)
    lengths = []
    make_cache = model.decoder.make_cache
    monkeypatch.setattr(
        model.decoder, "make_cache", lambda b, n: lengths.append(n) or make_cache(b, n)
    )
    progress = []
    tokens = model.generate_tokens(
        PROMPTS[1], duration=3.0, callback=lambda *a: progress.append(a), **LONG, **GREEDY
    )
    assert tokens.shape == (1, 4, 150)  # 3 s at 50 Hz, exactly
    (p0, s0, w0), (p1, s1, w1) = calls
    assert p0 is None and (s0, w0.shape) == (103, (1, 4, 100))
    assert same(p1, w0[..., 60:]) and (s1, w1.shape) == (50 + 3, (1, 4, 90))
    assert same(tokens, np.concatenate([w0, w1[..., 40:]], axis=-1))
    assert max(lengths) <= 103  # the KV cache never exceeds one window
    assert progress == [(i, 156) for i in range(1, 157)]  # one stream over every window
    monkeypatch.undo()
    assert same(tokens[..., :100], model.generate_tokens(PROMPTS[1], 103, **GREEDY))
    assert same(model.generate_tokens(PROMPTS[1], duration=3.0, **LONG, **GREEDY), tokens)


def test_long_continuation_and_sampling(model, monkeypatch):
    audio = tone(440)
    calls = capture_windows(monkeypatch)
    tokens = model.generate_tokens(PROMPTS[0], duration=3.0, audio_prompt=audio, **LONG, **GREEDY)
    assert tokens.shape == (1, 4, 175) and same(tokens[..., :25], model.encode_audio(audio))
    assert [c[2].shape[-1] for c in calls] == [100, 100, 55]
    assert same(calls[0][0], tokens[..., :25])
    assert same(calls[1][0], tokens[..., 60:100]) and same(calls[2][0], tokens[..., 120:160])
    new = model.generate_tokens(
        PROMPTS[0], duration=3.0, audio_prompt=audio, include_prompt=False, **LONG, **GREEDY
    )
    assert same(new, tokens[..., 25:])
    a = model.generate_tokens(PROMPTS[:2], duration=2.5, seed=5, **LONG)
    b = model.generate_tokens(PROMPTS[:2], duration=2.5, seed=5, **LONG)
    assert a.shape == (2, 4, 125) and same(a, b)


def test_long_stereo(stereo):
    tokens = stereo.generate_tokens(PROMPTS[0], duration=2.5, **LONG, **GREEDY)
    assert tokens.shape == (1, 8, 125)
    assert same(tokens[..., :100], stereo.generate_tokens(PROMPTS[0], 103, **GREEDY))
