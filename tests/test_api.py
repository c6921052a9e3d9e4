"""The public API end to end on the tiny checkpoint: tokens and audio equal transformers'; audio files."""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from musicgen import MusicGen, load_audio, save_audio

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"
PROMPTS = json.loads((EXPECTED / "prompts.json").read_text())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    return MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", progress=False)


@pytest.fixture(scope="module")
def expected():
    return np.load(EXPECTED / "generate.npz")


def test_properties(model):
    assert model.sampling_rate == 32000 and model.frame_rate == 50
    assert model.num_codebooks == 4 and model.audio_channels == 1
    assert model.max_steps == 2048
    assert model.config["model_type"] == "musicgen"
    assert model.decoder.layers[0].fc1.weight.dtype == mx.float32  # CPU default
    gc = model.generation_config  # from generation_config.json
    assert (gc["top_k"], gc["top_p"], gc["guidance_coef"], gc["max_length"]) == (
        250,
        0.0,
        3.0,
        1500,
    )


def test_greedy_tokens_and_audio_match_transformers(model, expected):
    tokens = model.generate_tokens(PROMPTS[:2], max_steps=40, top_k=1, guidance_coef=3.0)
    assert tokens.shape == (2, 4, 37)
    assert (np.array(tokens) == expected["batch_tokens"]).all()
    audio = model.decode_tokens(tokens)
    assert audio.shape == (2, 23680, 1) and audio.dtype == mx.float32
    assert rel_err(audio, expected["batch_audio"].transpose(0, 2, 1)) <= 1e-4


def test_generate_shapes_single_and_batch(model, expected):
    audio = model.generate(PROMPTS[0], max_steps=40, top_k=1)
    assert audio.shape == (23680, 1)
    assert rel_err(audio, expected["single_audio"][0].T) <= 1e-4
    batch = model.generate(PROMPTS[:2], duration=0.2, seed=1)
    assert batch.shape == (2, 10 * 640, 1)  # 0.2 s = 10 frames = 13 steps


def test_seed_reproducibility(model):
    a = model.generate_tokens(["a"], max_steps=20, seed=3)
    b = model.generate_tokens(["a"], max_steps=20, seed=3)
    c = model.generate_tokens(["a"], max_steps=20, seed=4)
    assert (np.array(a) == np.array(b)).all() and (np.array(a) != np.array(c)).any()


def test_long_generation_keeps_all_64_bits_of_the_seed(model):
    """Seeds 5 and 2**40 + 5 differ in every window, and the first window of a sliding-window run
    is the one-pass run with the same seed."""
    windows = {"duration": 0.6, "window_duration": 0.4, "extend_stride": 0.2}
    a = np.array(model.generate_tokens("a", seed=5, **windows))
    b = np.array(model.generate_tokens("a", seed=2**40 + 5, **windows))
    one_pass = np.array(model.generate_tokens("a", duration=0.4, seed=2**40 + 5))
    assert a.shape == b.shape == (1, 4, 30)
    assert (a[..., :20] != b[..., :20]).any()
    np.testing.assert_array_equal(b[..., :20], one_pass)


def test_same_seed_gives_identical_audio_and_no_seed_differs(model):
    a = np.array(model.generate("a", max_steps=30, seed=7))
    b = np.array(model.generate("a", max_steps=30, seed=7))
    c = np.array(model.generate("a", max_steps=30, seed=8))
    assert a.shape == (27 * 640, 1) and np.abs(a).max() > 0
    assert np.array_equal(a, b)  # bit for bit, not only the tokens
    assert not np.array_equal(a, c)
    # unseeded: two runs draw differently (temperature 2 so that the tiny model's draws spread out)
    x = model.generate_tokens("a", max_steps=40, temperature=2.0)
    y = model.generate_tokens("a", max_steps=40, temperature=2.0)
    assert (np.array(x) != np.array(y)).any()


def test_max_steps_and_duration_together_are_refused(model):
    with pytest.raises(ValueError, match="give max_steps or duration, not both"):
        model.generate_tokens("a", max_steps=20, duration=0.2)
    with pytest.raises(ValueError, match="give max_steps or duration, not both"):
        model.generate("a", 20, duration=0.2)
    assert model.generate_tokens("a", duration=0.2, top_k=1).shape == (1, 4, 10)


def test_progress_bar_by_default_for_long_generations(model, capfd):
    capfd.readouterr()
    model.generate_tokens("a", max_steps=100, top_k=1)
    shown = capfd.readouterr().err
    assert "/100" in shown and "step" in shown  # tqdm: "n/100 [.. step/s]"
    model.generate_tokens("a", max_steps=100, top_k=1, progress=False)
    model.generate_tokens("a", max_steps=99, top_k=1)  # short: no bar by default
    assert capfd.readouterr().err == ""
    model.generate_tokens("a", max_steps=20, top_k=1, progress=True)
    assert "/20" in capfd.readouterr().err


@pytest.mark.parametrize("length", [{"max_steps": 12}, {"duration": 0.2}])
def test_callback_gets_every_step_and_the_total(model, length):
    seen = []
    model.generate_tokens(
        "a", top_k=1, callback=lambda step, total: seen.append((step, total)), **length
    )
    total = 12 if "max_steps" in length else 13  # 0.2 s = 10 frames + 3 delay steps
    assert seen == [(step, total) for step in range(1, total + 1)]


def test_max_steps_limit(model):
    with pytest.raises(ValueError):
        model.generate_tokens("a", max_steps=model.max_steps + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": []}, "no prompts"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"top_k": 2.5}, "top_k must be an int >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\]"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"guidance_coef": -2.0}, "guidance_coef must be >= 0"),
        ({"audio_prompt": np.zeros((2, 32000))}, "more channels than samples"),
        # 1500 frames of prompt: no room left in the window without a duration
        ({"audio_prompt": np.zeros((1500 * 640, 1)), "max_steps": None}, "fill the model's 1500"),
    ],
    ids=lambda x: str(x) if isinstance(x, str) else None,
)
def test_bad_arguments_are_refused(model, kwargs, message):
    kwargs = {"prompts": "a", "max_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate_tokens(**kwargs)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_save_audio_round_trip(tmp_path, ext):
    t = np.arange(3200) / 32000
    audio = mx.array((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None])
    path = save_audio(tmp_path / f"out.{ext}", audio, 32000)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [f"out.{ext}"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's private 0600
    info = sf.info(str(path))
    assert (info.samplerate, info.channels) == (32000, 1)
    back, rate = load_audio(path)
    assert rate == 32000 and back.shape[1] == 1
    if ext != "ogg":  # lossless: 16-bit PCM
        assert back.shape == (3200, 1)
        assert np.abs(np.array(back) - np.array(audio)).max() < 1e-4
    resampled, rate = load_audio(path, sampling_rate=16000)
    assert rate == 16000 and abs(resampled.shape[0] - back.shape[0] // 2) <= 1


def test_save_audio_is_atomic(tmp_path):
    target = tmp_path / "out.wav"
    save_audio(target, np.zeros((100, 2), np.float32), 32000)
    before = target.read_bytes()
    with pytest.raises(ValueError):
        save_audio(target, np.zeros((2, 100, 2), np.float32), 32000)  # a batch: refused
    with pytest.raises(Exception):  # noqa: B017  (soundfile's own error type)
        save_audio(target, np.zeros((100, 2), np.float32), 32000, subtype="NOT_A_SUBTYPE")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]
    with pytest.raises(ValueError):
        save_audio(tmp_path / "out.mp4", np.zeros((100, 1), np.float32), 32000)
    save_audio(tmp_path / "batch1.wav", mx.zeros((1, 100, 2)), 32000)
    assert sf.info(str(tmp_path / "batch1.wav")).channels == 2


def test_ogg_sample_rate_limit(tmp_path):
    """libvorbis crashes the process above ~200 kHz: save_audio refuses such rates for .ogg first."""
    audio = np.zeros((19200, 1), np.float32)
    with pytest.raises(ValueError, match="up to 192000 Hz, got 200875"):
        save_audio(tmp_path / "high.ogg", audio, 200875)
    assert list(tmp_path.iterdir()) == []
    assert sf.info(str(save_audio(tmp_path / "top.ogg", audio, 192000))).samplerate == 192000
    assert sf.info(str(save_audio(tmp_path / "high.wav", audio, 384000))).samplerate == 384000


def test_stereo_tokens_and_audio_match_transformers():
    """fp16 2023-style .bin, 8 interleaved codebooks (delays 0,0,1,1,2,2,3,3), L/R decoded separately."""
    stereo = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen-stereo", progress=False)
    expected = np.load(EXPECTED / "stereo.npz")
    assert stereo.num_codebooks == 8 and stereo.audio_channels == 2
    tokens = stereo.generate_tokens(PROMPTS[0], max_steps=30, top_k=1, guidance_coef=3.0)
    assert tokens.shape == (1, 8, 27)
    assert (np.array(tokens) == expected["tokens"]).all()
    audio = stereo.decode_tokens(tokens)
    assert audio.shape == (1, 17280, 2)
    assert rel_err(audio, expected["audio"].transpose(0, 2, 1)) <= 1e-4


def test_2023_checkpoint_gives_the_same_tokens(expected):
    old = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen-2023", progress=False)
    tokens = old.generate_tokens(PROMPTS[:2], max_steps=40, top_k=1)
    assert (np.array(tokens) == expected["batch_tokens"]).all()


def test_float16_and_quantized_loading(expected):
    half = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", dtype=mx.float16, progress=False)
    assert half.decoder.layers[0].fc1.weight.dtype == mx.float16
    assert half.text_encoder.parameters()["embed_tokens"]["weight"].dtype == mx.float32
    tokens = half.generate_tokens(PROMPTS[0], max_steps=40, top_k=1)
    assert tokens.shape == (1, 4, 37)
    # the tiny decoder's layers are narrower than a quantization group: loading still works, unquantized
    quantized = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", quantize=8, progress=False)
    tokens = quantized.generate_tokens(PROMPTS[:2], max_steps=40, top_k=1)
    assert (np.array(tokens) == expected["batch_tokens"]).all()
