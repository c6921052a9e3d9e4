"""MusicGen-Melody: the checkpoint loads, logits and greedy tokens equal transformers', every mode runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soxr
from reference import melody_test_signal

from musicgen import MusicGen, cpu_kernels
from musicgen.chroma import chroma_features
from musicgen.generate import generate_long

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"
MELODY = FIXTURES / "tiny-musicgen-melody"
PROMPTS = json.loads((EXPECTED / "prompts.json").read_text())
GREEDY = {"top_k": 1, "guidance_coef": 3.0, "progress": False}


@pytest.fixture(scope="module")
def model() -> MusicGen:
    return MusicGen.from_pretrained(MELODY, progress=False)


@pytest.fixture(scope="module")
def expected():
    return np.load(EXPECTED / "melody.npz")


@pytest.fixture(params=[True, False], ids=["cpu kernels", "mlx operations"])
def kernels(request, monkeypatch):
    """Run on the fused CPU kernels (where they run) and on MLX's operations."""
    if not request.param:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif not cpu_kernels.wanted():
        pytest.skip("the CPU kernels run on x86-64 Linux with AVX-512 only")
    return request.param


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_checkpoint_loads_as_melody(model):
    config = model.decoder_config
    assert model.is_melody and not config.cross_attention
    assert (config.num_chroma, config.chroma_length) == (12, 235)
    assert model.max_steps == 2048 - 235
    assert not hasattr(model.decoder.layers[0], "encoder_attn")
    assert model.decoder.audio_enc_to_dec_proj.weight.shape == (16, 12)
    assert model.decoder.enc_to_dec_proj.weight.shape == (16, 32)
    mono = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", progress=False)
    assert not mono.is_melody and mono.prefix_positions("x") == 0


def test_teacher_forced_logits_match_transformers(model, expected):
    """The prefix (chroma of two melodies, then padded text) and 8 tokens in one forward."""
    ids, mask = mx.array(expected["batch_input_ids"]), mx.array(expected["batch_attention_mask"])
    states = model.text_encoder(ids, mask)
    prefix = model.decoder.conditioning_prefix(states, mask, mx.array(expected["chroma_batch"]))
    assert prefix.shape == (2, 235 + ids.shape[1], 16)
    tokens = mx.array(expected["decoder_input_ids"]).reshape(2, 4, -1)
    logits = model.decoder(tokens, model.decoder.cross_states(None), None, 0, prefix)
    assert logits.shape == (2, 4, prefix.shape[1] + 8, 2048)
    ref = expected["logits"].reshape(2, 4, 8, 2048)
    assert rel_err(logits[:, :, -8:], ref) <= 1e-5


def test_greedy_text_and_melody_match_transformers(model, expected, kernels):
    signal = melody_test_signal()
    tokens = model.generate_tokens(PROMPTS[0], 40, melody=signal, **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), expected["text_melody_tokens"])
    assert tokens.shape == (1, 4, 37)


def test_greedy_text_alone_matches_transformers(model, expected, kernels):
    tokens = model.generate_tokens(PROMPTS[0], 40, **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), expected["text_tokens"])


def test_greedy_melody_alone_matches_transformers(model, expected, kernels):
    """No text: one zero text state after the chroma, and guidance (melody vs no melody) stays on."""
    tokens = model.generate_tokens(None, 40, melody=melody_test_signal(), **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), expected["melody_tokens"])


def test_greedy_batch_with_two_melodies_matches_transformers(model, expected, kernels):
    """Two padded prompts, two melodies of different lengths (the shorter zero-padded), 4 rows."""
    signal = melody_test_signal()
    tokens = model.generate_tokens(PROMPTS[:2], 40, melody=[signal, signal[:64000]], **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), expected["batch_tokens"])


def test_audio_matches_transformers(model, expected):
    audio = model.generate(PROMPTS[0], 40, melody=melody_test_signal(), **GREEDY)
    assert audio.shape == (37 * 640, 1)
    assert rel_err(audio[:, 0], expected["text_melody_audio"][0, 0]) <= 1e-4


def test_melody_at_another_rate_and_in_stereo(model, expected):
    """A 44.1 kHz stereo melody: resampled and mixed down, it gives the same chroma and tokens."""
    signal = melody_test_signal()
    stereo = soxr.resample(signal, 32000, 44100, quality="HQ")
    stereo = np.stack([stereo, 0.5 * stereo], axis=1)
    chroma = model.encode_melody(stereo, 44100)
    np.testing.assert_array_equal(np.array(chroma), expected["chroma"])
    tokens = model.generate_tokens(
        PROMPTS[0], 40, melody=mx.array(stereo), melody_sampling_rate=44100, **GREEDY
    )
    np.testing.assert_array_equal(np.array(tokens), expected["text_melody_tokens"])


def test_one_melody_for_several_prompts(model):
    """One melody is shared by every prompt. transformers attends to the text padding (zeroed, not
    masked), so only the longest prompt, which has no padding, equals itself generated alone."""
    signal = melody_test_signal()
    assert len(model.tokenizer.encode([PROMPTS[1]])[0][0]) > len(
        model.tokenizer.encode([PROMPTS[0]])[0][0]
    )
    both = model.generate_tokens(PROMPTS[:2], 40, melody=signal, **GREEDY)
    second = model.generate_tokens(PROMPTS[1], 40, melody=signal, **GREEDY)
    assert both.shape == (2, 4, 37)
    np.testing.assert_array_equal(np.array(both[1:]), np.array(second))


def test_audio_prompt_with_melody_matches_transformers(model, expected, kernels):
    """Continuing audio while following a melody: the prefix, bos and the delayed prompt in one
    prefill, then the new steps; the prompt's frames come first (transformers' decoder_input_ids)."""
    prompt = np.load(EXPECTED / "continuation.npz")["prompt_audio"][0, 0]  # 25 frames
    signal = melody_test_signal()
    tokens = model.generate_tokens(PROMPTS[0], 20, audio_prompt=prompt, melody=signal, **GREEDY)
    np.testing.assert_array_equal(np.array(tokens), expected["continuation_tokens"])
    assert tokens.shape == (1, 4, 25 + 17)
    new = model.generate_tokens(
        PROMPTS[0], 20, audio_prompt=prompt, melody=signal, include_prompt=False, **GREEDY
    )
    np.testing.assert_array_equal(np.array(new), np.array(tokens[..., 25:]))


def test_long_generation_follows_the_melody_window_by_window(model):
    """Beyond the window, each window is conditioned on the melody's matching stretch, looped."""
    signal = melody_test_signal()  # 4 s
    chroma_at = model._melody_windows(signal, 32000, window=1500)
    np.testing.assert_array_equal(np.array(chroma_at(0)), np.array(model.encode_melody(signal)))
    # window 2 of a 30 s window with an 18 s stride starts at 18 s: 2 s into the 4 s melody, looped
    looped = np.resize(np.roll(signal, -64000), 30 * 32000)
    np.testing.assert_array_equal(np.array(chroma_at(900)), np.array(model.encode_melody(looped)))
    windows = {"window_duration": 0.5, "extend_stride": 0.3, "seed": 3, "progress": False}
    tokens = model.generate_tokens(PROMPTS[0], duration=1.0, melody=signal, **windows)
    assert tokens.shape == (1, 4, 50)
    again = model.generate_tokens(PROMPTS[0], duration=1.0, melody=signal, **windows)
    np.testing.assert_array_equal(np.array(tokens), np.array(again))
    # each window asks for the chroma at its first frame
    asked = []

    def chroma_for(offset: int) -> mx.array:
        asked.append(offset)
        return chroma_at(offset)

    states, mask = model.encode_text([PROMPTS[0]])
    out = generate_long(
        model.decoder, states, mask, 50, window=25, stride=15, chroma=chroma_for, seed=3, top_k=5
    )
    assert out.shape == (1, 4, 50) and asked == [0, 15, 30]


def test_chroma_settings_come_from_the_checkpoint(model, tmp_path):
    """preprocessor_config.json (transformers' feature extractor settings) sets the chroma's STFT."""
    assert model.chroma_config == {
        "n_fft": 16384, "hop_length": 4096, "target_rate": 32000, "max_seconds": 30.0,
    }  # fmt: skip
    folder = tmp_path / "melody"
    shutil.copytree(MELODY, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(hop_length=2048, chunk_length=2)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    other = MusicGen.from_pretrained(folder, progress=False)
    chroma = other.encode_melody(melody_test_signal())  # 2 s kept, a frame every 2048 samples
    assert chroma.shape == (1, 1 + 64000 // 2048, 12)
    ref = chroma_features(melody_test_signal()[:64000], 32000, hop_length=2048)
    np.testing.assert_array_equal(np.array(chroma), ref)


def test_positions_left_after_the_prefix(model):
    """The prefix takes 235 chroma frames + the padded text; a pass gets the positions left over."""
    assert model.prefix_positions(PROMPTS[0]) == 235 + 9
    assert model.prefix_positions(PROMPTS[:2]) == 235 + 23
    assert model.prefix_positions(None) == 235 + 1
    with pytest.raises(ValueError, match="exceeds the model's maximum 1804 steps"):
        model.generate_tokens(PROMPTS[0], 2048 - 244 + 1, **GREEDY)


def test_melody_needs_a_melody_model():
    mono = MusicGen.from_pretrained(FIXTURES / "tiny-musicgen", progress=False)
    with pytest.raises(ValueError, match="takes no melody"):
        mono.generate_tokens("x", 10, melody=melody_test_signal())


def test_melody_batch_mismatch(model):
    signal = melody_test_signal()
    with pytest.raises(ValueError, match="3 prompts but 2 melodies"):
        model.generate_tokens(["a", "b", "c"], 10, melody=[signal, signal])


def test_generate_returns_a_batch_for_a_batch_of_melodies(model, expected):
    """One prompt (or none) and two melodies: two clips, the first the same as its melody alone."""
    signal = melody_test_signal()
    both = model.generate(PROMPTS[0], 40, melody=[signal, signal[:64000]], **GREEDY)
    assert both.shape == (2, 37 * 640, 1)
    assert rel_err(both[0, :, 0], expected["text_melody_audio"][0, 0]) <= 1e-4
    assert model.generate(
        None, 20, melody=np.stack([signal, signal])[..., None], **GREEDY
    ).shape == (
        2,
        17 * 640,
        1,
    )
    assert model.generate(None, 20, melody=signal, **GREEDY).shape == (17 * 640, 1)


def test_the_parts_load_from_a_melody_folder():
    """T5Encoder and EncodecModel.from_pretrained take a MusicGen-Melody folder, as a MusicGen one."""
    from encodec.encodec import EncodecModel
    from t5.t5 import T5Encoder

    folder = FIXTURES / "tiny-musicgen-melody"
    assert T5Encoder.from_pretrained(folder).config.d_model > 0
    assert EncodecModel.from_pretrained(folder).config.sampling_rate == 32000
