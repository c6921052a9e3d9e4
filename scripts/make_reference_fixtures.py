"""Build the tiny reference checkpoints and expected outputs in tests/fixtures/ (the numerical oracle).

Runs in a separate venv with torch and transformers (never needed by CI or at run time), with exactly these
versions (PINNED below; main() warns when the installed ones differ):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # 2.13.0+cpu
    /tmp/ref/bin/pip install transformers==5.23.0 tokenizers==0.23.3 sentencepiece==0.2.3 \
        protobuf==7.36.2 safetensors==0.8.0 numpy==2.4.6
    /tmp/ref/bin/pip install --no-deps torchaudio==2.11.0   # for MusicgenMelodyFeatureExtractor only
    mv /tmp/ref/lib/python3.11/site-packages/torchaudio/lib/*.so /tmp/   # built for another torch; the
        # extractor needs only torchaudio's pure-Python Spectrogram, which works without them
    /tmp/ref/bin/python scripts/make_reference_fixtures.py --check   # regenerate in a temp dir, compare
    /tmp/ref/bin/python scripts/make_reference_fixtures.py           # writes tests/fixtures/

Generated with torch 2.13.0+cpu, transformers 5.23.0, tokenizers 0.23.3, sentencepiece 0.2.3, protobuf 7.36.2,
safetensors 0.8.0, numpy 2.4.6 and torchaudio 2.11.0 (without its compiled extensions) on Python 3.11 (Linux x86_64). Everything is seeded; running it twice gives
byte-identical files (checked by `--check`, which regenerates into a temp folder and compares). Other versions
may change the trained sentencepiece model, the random weights or the last bits of the expected outputs.

Checkpoints (Hugging Face layout), all sharing one set of T5 and EnCodec weights:
- tiny-musicgen/         mono MusicGen, transformers-5 names, fp32 model.safetensors, spiece.model, tokenizer files
                         (the other folders carry spiece.model + tokenizer_config.json only, to stay small).
- tiny-musicgen-2023/    the same weights as the 2023 checkpoints store them: sharded
                         pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json, weight_g/weight_v,
                         only text_encoder.shared.weight (no encoder.embed_tokens), a transformers-4.31-style config;
                         stored as fp16 to keep the fixtures small. Every weight of tiny-musicgen is fp16-exact, so
                         both folders hold identical values and must give identical outputs.
- tiny-musicgen-stereo/  stereo MusicGen (8 codebooks, audio_channels 2), fp16 pytorch_model.bin with 2023 names
                         (like musicgen-stereo-medium); values are fp16-exact and the reference ran in fp32.
- tiny-musicgen-melody/  MusicgenMelodyForConditionalGeneration (a decoder the size of the mono one, without
                         cross-attention; num_chroma 12, chroma_length 235, enc_to_dec_proj and
                         audio_enc_to_dec_proj), transformers-5 names, fp16 model.safetensors (fp16-exact values;
                         the reference ran in fp32), spiece.model + tokenizer_config.json, and the feature
                         extractor's preprocessor_config.json (its defaults, the published values).
- tiny-t5/               standalone T5EncoderModel (the same text-encoder weights) + spiece.model.
- tiny-encodec/          standalone EncodecModel (the same audio-encoder weights).
- tensors-bf16.bin       a torch.save'd dict with bf16, fp16 and a strided fp32 view (for the .bin reader).

Shapes keep the real conventions: T5 relative buckets 32 / max distance 128 (d_model 32, 2 layers, 4 heads),
audio vocab 2048 with pad/bos 2048, EnCodec 32 kHz strides [8,5,4,4] (hop 640, 50 Hz, 2 filters, hidden =
codebook dim 8, 4 codebooks from bandwidth 2.2), decoder hidden 16 (2 layers, 2 heads, ffn 32) != T5 width 32, so enc_to_dec_proj exists.

Weights are non-degenerate: random codebooks, weight-norm gains != ||v||, LayerNorm/RMSNorm weights != 1, random
biases, and LM heads scaled up so that greedy decoding has wide margins (token-exact comparison is fair).

Expected outputs, in expected/ (all arrays float32 or int32; prompts in expected/prompts.json):
- t5.npz:      input_ids, attention_mask (padded batch of PROMPTS, reference tokenizer, padding=True),
               hidden (batch, len, 32) of T5EncoderModel on that batch; ids_<i>, hidden_<i> for each prompt alone.
- encodec.npz: decode_codes_<n>, decode_audio_<n> (batch 1, channels 1, n*640) for n in 1, 7, 50;
               decode_codes_1500 with decode_audio_1500_head / _tail (first/last 8192 samples) and _sub32
               (every 32nd sample); encode_audio_<name>, encode_codes_<name> for name in 1f (640 samples),
               20f (12800), odd (5000 samples, not a multiple of the hop); encode_codes_30s for the 30 s signal
               `long_test_signal()` below (recompute it; it is not stored).
- decoder.npz: teacher-forced forward of MusicgenForConditionalGeneration: input_ids, attention_mask (2 prompts,
               padded), decoder_input_ids (2*4, 8) (first column bos 2048), logits (2*4, 8, 2048).
- generate.npz: greedy CFG (do_sample=False, guidance_scale=3.0, max_new_tokens=40) on the mono model:
               batch_input_ids, batch_attention_mask, batch_tokens (2, 4, 37), batch_audio (2, 1, 23680);
               single_input_ids, single_tokens (1, 4, 37), single_audio for PROMPTS[0] alone;
               long_tokens (1, 4, 250) for PROMPTS[1] with max_new_tokens=253.
- continuation.npz: audio prompt `prompt_audio` (1, 1, 16000 = 25 frames) + text PROMPTS[0], greedy CFG,
               max_new_tokens=20: prompt_codes (1, 4, 25) (EnCodec encode of the prompt), tokens (1, 4, F),
               audio (1, 1, F*640), with the prompt frames included as transformers returns them.
- stereo.npz:  stereo model, PROMPTS[0], greedy CFG, max_new_tokens=30: input_ids, tokens (1, 8, 27),
               audio (1, 2, 17280); and teacher-forced logits for decoder_input_ids (8, 4).
- melody.npz:  the melody model and MusicgenMelodyFeatureExtractor() (sr 32000, n_fft 16384, hop 4096) on the
               4 s signal `melody_test_signal()` below (recompute it; it is not stored):
               chroma (1, 32, 12) one-hot input_features; chroma_short (1, 5, 12) for its first 10000 samples
               (shorter than n_fft: zero-padded to it, centred); chroma_batch (2, 32, 12) for [signal,
               signal[:64000]] (zero-padded to the longest); filter_bank_rows = chroma_filter_bank[:, ::64]
               (12, 129). Greedy CFG (guidance 3.0, max_new_tokens=40), tokens (b, 4, 37):
               text_melody_input_ids + text_melody_tokens, text_melody_audio (1, 1, 23680) for PROMPTS[0] with
               input_features=chroma; text_tokens for PROMPTS[0] alone; batch_input_ids, batch_attention_mask
               (PROMPTS[:2], padded) + batch_tokens with input_features=chroma_batch; melody_tokens for
               input_features=chroma alone (generated as input_ids=[[0]], attention_mask=[[0]]: see
               melody_expected). Teacher-forced: decoder_input_ids (2*4, 8) (first column bos 2048) and logits
               (2*4, 8, 2048) for the padded pair + chroma_batch; transformers' melody logits cover the
               conditioning prefix (chroma_length 235 + text length 23) then the decoder tokens: these are the
               last 8 positions of its 266. continuation_tokens (1, 4, 42): PROMPTS[0] + chroma continuing
               continuation.npz's prompt_audio (its 25 EnCodec frames as decoder_input_ids; transformers
               prepends bos), max_new_tokens=20, the prompt frames included.
- modes.npz:   left, right: 0.5 s decaying tones of 440 and 660 Hz (16000 samples). stereo_tokens (1, 8, 42)
               and stereo_audio (1, 2, 26880): the stereo model continuing [left, right] as one stereo
               prompt with PROMPTS[0], max_new_tokens=20; batch_tokens (2, 4, 34) and batch_audio (2, 1,
               21760): the mono model continuing left and right with the padded pair PROMPTS[:2]
               (max_new_tokens=12). Greedy CFG 3.0; prompt frames included.
- tensors-bf16.npz: expected float32 values of tensors-bf16.bin (keys a, b, c).
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    EncodecConfig,
    EncodecModel,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
    MusicgenMelodyFeatureExtractor,
    MusicgenMelodyForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SEED = 1234
PROMPTS = [
    "happy rock",
    "80s pop track with bassy drums and synth",
    "Lo-fi hip hop beat, chill, 90 BPM!",
    "ünknown wörds — and symbols #@ 123",
]
CORPUS = [
    "happy rock with electric guitars and drums",
    "80s pop track with bassy drums and synth",
    "lo-fi hip hop beat with a chill piano melody",
    "epic orchestral music with strings and brass",
    "a calm acoustic guitar ballad for a rainy day",
    "energetic techno with a driving bass line at 128 bpm",
    "jazz trio with piano, double bass and brushes",
    "ambient pads and soft bells, slow and dreamy",
    "heavy metal riff with distorted guitars and fast drums",
    "reggae groove with offbeat guitar and deep bass",
    "cinematic trailer music, dark and powerful",
    "a happy ukulele tune with whistling and claps",
]


def train_tokenizer(folder: Path) -> None:
    """Train a tiny T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) into folder/spiece.model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=100,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())


def configs(stereo: bool = False) -> MusicgenConfig:
    text = T5Config(
        vocab_size=208,  # 100 sentencepiece pieces + 100 extra ids, rounded up like t5-base 32128
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=True,
    )
    audio = EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,
        num_filters=2,
        hidden_size=8,
        codebook_size=2048,
        codebook_dim=8,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2],
        num_lstm_layers=2,
        num_residual_layers=1,
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        dilation_growth_rate=2,
        compress=2,
        norm_type="weight_norm",
        pad_mode="reflect",
        use_causal_conv=False,
        normalize=False,
        use_conv_shortcut=False,
        trim_right_ratio=1.0,
        chunk_length_s=None,
        overlap=None,
    )
    decoder = MusicgenDecoderConfig(**decoder_sizes(stereo))
    return MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)


def decoder_sizes(stereo: bool = False) -> dict:
    """The tiny decoder's settings (the MusicGen and the melody decoder configs share them)."""
    return dict(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        hidden_size=16,
        num_codebooks=8 if stereo else 4,
        audio_channels=2 if stereo else 1,
        pad_token_id=2048,
        bos_token_id=2048,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
        tie_word_embeddings=False,
    )


def melody_config() -> MusicgenMelodyConfig:
    """The mono T5 and EnCodec configs with a melody decoder, laid out like facebook/musicgen-melody's."""
    mono = configs()
    decoder = MusicgenMelodyDecoderConfig(**decoder_sizes())
    return MusicgenMelodyConfig(
        text_encoder=mono.text_encoder,
        audio_encoder=mono.audio_encoder,
        decoder=decoder,
        num_chroma=12,
        chroma_length=235,
    )


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter and buffer with seeded, non-degenerate random values."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("original0") or name.endswith("weight_g"):
                continue  # gains are set from their direction below
            if "layer_norm" in name or name.endswith("final_layer_norm.weight"):
                new = 1.0 + 0.3 * randn(*t.shape) if leaf == "weight" else 0.2 * randn(*t.shape)
            elif "relative_attention_bias" in name:
                new = 0.8 * randn(*t.shape)
            elif (
                "embed_tokens" in name
                or name.endswith("shared.weight")
                or name.endswith("codebook.embed")
            ):
                new = randn(*t.shape)
            elif name.endswith(("embed_avg", "cluster_size")) or name.endswith("inited"):
                new = torch.ones_like(t)
            elif "lm_heads" in name:
                new = 2.5 * randn(*t.shape)
            elif "embed_positions" in name:
                continue
            elif leaf.startswith("bias") or name.endswith("bias"):
                new = 0.1 * randn(*t.shape)
            elif t.ndim >= 2:
                fan_in = t[0].numel()
                new = randn(*t.shape) / fan_in**0.5
            else:
                new = randn(*t.shape)
            t.copy_(new)
        # weight norm: gain = ||v|| * U(0.5, 1.5) per output channel (so the gain is never a no-op)
        for name in sorted(state):
            for g_suffix, v_suffix in (("original0", "original1"), ("weight_g", "weight_v")):
                if name.endswith(g_suffix):
                    v = state[name[: -len(g_suffix)] + v_suffix]
                    norm = v.flatten(1).norm(dim=1).reshape(state[name].shape)
                    scale = 0.5 + torch.rand(state[name].shape, generator=gen)
                    state[name].copy_(norm * scale)


def fp16_exact(model: torch.nn.Module) -> None:
    """Round every floating parameter and buffer to a value that float16 represents exactly."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.half() if t.is_floating_point() else t for n, t in state.items()}


def to_2023_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers-5 weight-norm parametrizations to 2023 weight_g/weight_v; untie the T5 embedding."""
    out = {}
    for name, t in state.items():
        name = name.replace("parametrizations.weight.original0", "weight_g")
        name = name.replace("parametrizations.weight.original1", "weight_v")
        if name == "text_encoder.encoder.embed_tokens.weight":
            continue
        out[name] = t.detach().clone().contiguous()
    return out


def config_2023(folder: Path, torch_dtype: str) -> None:
    """Rewrite a transformers-5 config.json the way transformers 4.31 wrote the published ones."""
    path = folder / "config.json"
    config = json.loads(path.read_text())

    def patch(d: dict) -> dict:
        d.pop("dtype", None)
        d["torch_dtype"] = torch_dtype
        d["transformers_version"] = "4.31.0.dev0"
        return d

    for key in ("text_encoder", "audio_encoder", "decoder"):
        patch(config[key])
    patch(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """Save a state dict as torch .bin, sharded like transformers 4.3x when shards > 1."""
    names = sorted(state)
    if shards == 1:
        torch.save({n: state[n] for n in names}, folder / "pytorch_model.bin")
        return
    per = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        for n in part:
            weight_map[n] = file
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )


def generation_config(model: MusicgenForConditionalGeneration) -> None:
    gc = model.generation_config
    gc.do_sample = True
    gc.top_k = 250
    gc.guidance_scale = 3.0
    gc.max_length = 1500
    gc.bos_token_id = 2048
    gc.pad_token_id = 2048
    gc.decoder_start_token_id = 2048


def with_mono_codecs(model, mono, gen: torch.Generator):
    """`model` in eval mode with random fp16-exact weights, then the mono model's T5 and EnCodec."""
    model.eval()
    randomize(model, gen)
    model.text_encoder.load_state_dict(mono.text_encoder.state_dict())
    model.audio_encoder.load_state_dict(mono.audio_encoder.state_dict())
    fp16_exact(model)
    generation_config(model)
    return model


def greedy(model, max_new_tokens: int, **inputs):
    """transformers' greedy CFG generation; returns (tokens (b, k, frames), audio (b, c, samples))."""
    captured = []
    decode = model.audio_encoder.decode

    def capture(audio_codes, *args, **kwargs):
        captured.append(audio_codes.clone())
        return decode(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = capture
    try:
        audio = model.generate(
            **inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=max_new_tokens
        )
    finally:
        model.audio_encoder.decode = decode
    codes = captured[0][0] if len(captured) == 1 else torch.cat([captured[0][0], captured[1][0]], 1)
    if len(captured) == 2:  # stereo: left = even codebooks, right = odd: re-interleave
        left, right = captured[0][0], captured[1][0]
        codes = torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])
    return codes.to(torch.int32).numpy(), audio.float().numpy()


def decaying_tone(freq: float, samples: int = 16000) -> torch.Tensor:
    """0.5 s of a decaying sine at 32 kHz (tests/test_modes.py's `tone`)."""
    t = torch.arange(samples, dtype=torch.float64) / 32000
    return (0.5 * torch.sin(2 * torch.pi * freq * t) * torch.exp(-3 * t)).float()


def long_test_signal() -> np.ndarray:
    """The 30 s test signal for EnCodec encode parity (also recomputed by the tests)."""
    t = np.arange(30 * 32000, dtype=np.float64) / 32000
    sig = 0.4 * np.sin(2 * np.pi * 220.0 * t) + 0.25 * np.sin(2 * np.pi * 331.7 * t) * np.cos(
        np.pi * 0.5 * t
    )
    sig += 0.1 * np.sign(np.sin(2 * np.pi * 3.0 * t))
    return sig.astype(np.float32)


def melody_test_signal() -> np.ndarray:
    """The 4 s melody at 32 kHz for the chroma features (also recomputed by the tests).

    Four 1 s notes C4, E4, G4, C5 (equal temperament, A4 = 440 Hz), each a fundamental with harmonics 2 and 3
    at amplitudes 1, 0.4, 0.2, times 0.3, with 20 ms linear fades in and out.
    """
    rate = 32000
    t = np.arange(rate, dtype=np.float64) / rate
    fade = np.minimum(1.0, np.minimum(t, 1.0 - t) / 0.02)
    notes = []
    for midi in (60, 64, 67, 72):
        f = 440.0 * 2.0 ** ((midi - 69) / 12)
        tone = sum(a * np.sin(2 * np.pi * h * f * t) for h, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
        notes.append(0.3 * fade * tone)
    return np.concatenate(notes).astype(np.float32)


def melody_expected(
    melody: MusicgenMelodyForConditionalGeneration, tokenizer: T5Tokenizer, gen: torch.Generator
) -> dict[str, np.ndarray]:
    """Chroma features, greedy CFG generations and teacher-forced logits of the melody model."""
    extractor = MusicgenMelodyFeatureExtractor()
    signal = melody_test_signal()

    def chroma(audio) -> torch.Tensor:
        return extractor(
            audio, sampling_rate=32000, padding=True, return_tensors="pt"
        ).input_features

    features = chroma(signal)
    batch_features = chroma([signal, signal[:64000]])
    out = {
        "chroma": features.numpy(),
        "chroma_short": chroma(signal[:10000]).numpy(),
        "chroma_batch": batch_features.numpy(),
        "filter_bank_rows": extractor.chroma_filters[:, ::64].numpy(),
    }
    single = tokenizer(PROMPTS[:1], return_tensors="pt")
    pair = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    out["text_melody_input_ids"] = single.input_ids.to(torch.int32).numpy()
    out["text_melody_tokens"], out["text_melody_audio"] = greedy(
        melody, 40, input_features=features, **single
    )
    out["text_tokens"], _ = greedy(melody, 40, **single)
    out["batch_input_ids"] = pair.input_ids.to(torch.int32).numpy()
    out["batch_attention_mask"] = pair.attention_mask.to(torch.int32).numpy()
    out["batch_tokens"], _ = greedy(melody, 40, input_features=batch_features, **pair)
    # melody alone: generate(input_features=...) runs T5 on one dummy id 2048 (its bos) with mask 0 (2048 is
    # its pad too), an IndexError with this tiny T5 vocab; one masked pad id is the same computation
    none = torch.zeros((1, 1), dtype=torch.long)
    out["melody_tokens"], _ = greedy(
        melody, 40, input_ids=none, attention_mask=none, input_features=features
    )

    dec_ids = torch.randint(0, 2048, (2 * 4, 8), generator=gen)
    dec_ids[:, 0] = 2048
    logits = melody(**pair, input_features=batch_features, decoder_input_ids=dec_ids).logits
    out["decoder_input_ids"] = dec_ids.to(torch.int32).numpy()
    out["logits"] = logits[:, -dec_ids.shape[1] :].numpy()

    # audio-prompt continuation: the prompt's codes as decoder_input_ids (the same prompt as continuation.npz)
    t = torch.arange(16000, dtype=torch.float64) / 32000
    prompt_audio = (0.5 * torch.sin(2 * torch.pi * 440 * t) * torch.exp(-3 * t)).float()[None, None]
    codes = melody.audio_encoder.encode(prompt_audio).audio_codes[0]
    out["continuation_tokens"], _ = greedy(
        melody, 20, input_features=features, decoder_input_ids=codes.reshape(4, -1), **single
    )
    return out


def encodec_expected(encodec: EncodecModel, gen: torch.Generator) -> dict[str, np.ndarray]:
    out = {}
    for n in (1, 7, 50, 1500):
        codes = torch.randint(0, 2048, (1, 4, n), generator=gen)
        audio = encodec.decode(codes[None], [None]).audio_values.float().numpy()
        out[f"decode_codes_{n}"] = codes.to(torch.int32).numpy()
        if n == 1500:
            out["decode_audio_1500_head"] = audio[..., :8192]
            out["decode_audio_1500_tail"] = audio[..., -8192:]
            out["decode_audio_1500_sub32"] = audio[..., ::32]
        else:
            out[f"decode_audio_{n}"] = audio
    for name, length in (("1f", 640), ("20f", 12800), ("odd", 5000)):
        audio = 0.5 * torch.randn(1, 1, length, generator=gen)
        out[f"encode_audio_{name}"] = audio.numpy()
        out[f"encode_codes_{name}"] = encodec.encode(audio).audio_codes[0].to(torch.int32).numpy()
    signal = torch.from_numpy(long_test_signal())[None, None]
    out["encode_codes_30s"] = encodec.encode(signal).audio_codes[0].to(torch.int32).numpy()
    return out


def build(out: Path) -> None:
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    expected = out / "expected"
    expected.mkdir(exist_ok=True)

    # tokenizer
    tok_dir = out / "_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    train_tokenizer(tok_dir)
    tokenizer = T5Tokenizer.from_pretrained(str(tok_dir))

    # mono model
    mono = MusicgenForConditionalGeneration(configs()).eval()
    randomize(mono, gen)
    fp16_exact(mono)  # so the fp16 2023 shards below hold exactly the same values
    generation_config(mono)
    mono_dir = out / "tiny-musicgen"
    mono.save_pretrained(mono_dir)
    tokenizer.save_pretrained(mono_dir)
    shutil.copy(tok_dir / "spiece.model", mono_dir / "spiece.model")

    # the same weights as a 2023 checkpoint
    old_dir = out / "tiny-musicgen-2023"
    old_dir.mkdir(exist_ok=True)
    save_bin_shards(half(to_2023_names(mono.state_dict())), old_dir, shards=2)
    for name in ("config.json", "generation_config.json", "spiece.model", "tokenizer_config.json"):
        shutil.copy(mono_dir / name, old_dir / name)
    config_2023(old_dir, "float16")

    # standalone T5 and EnCodec with the same weights
    t5 = T5EncoderModel(mono.config.text_encoder).eval()
    t5.load_state_dict(mono.text_encoder.state_dict())
    t5.save_pretrained(out / "tiny-t5")
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(mono_dir / name, out / "tiny-t5" / name)
    encodec = EncodecModel(mono.config.audio_encoder).eval()
    encodec.load_state_dict(mono.audio_encoder.state_dict())
    encodec.save_pretrained(out / "tiny-encodec")

    # stereo: same T5/EnCodec, its own decoder; fp16-exact values saved as an fp16 .bin
    stereo = with_mono_codecs(MusicgenForConditionalGeneration(configs(stereo=True)), mono, gen)
    stereo_dir = out / "tiny-musicgen-stereo"
    stereo.save_pretrained(stereo_dir)
    (stereo_dir / "model.safetensors").unlink()
    save_bin_shards(half(to_2023_names(stereo.state_dict())), stereo_dir, shards=1)
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(mono_dir / name, stereo_dir / name)
    config_2023(stereo_dir, "float16")
    shutil.rmtree(tok_dir)

    # a .bin with bf16, fp16 and a strided view (storage offset, non-contiguous)
    base = torch.randn(5, 6, generator=gen)
    tensors = {
        "a": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "b": torch.randn(2, 3, generator=gen).half(),
        "c": base[1:, 2:].t(),
    }
    torch.save(tensors, out / "tensors-bf16.bin")
    np.savez(expected / "tensors-bf16.npz", **{k: v.float().numpy() for k, v in tensors.items()})

    (expected / "prompts.json").write_text(json.dumps(PROMPTS, indent=2, ensure_ascii=False) + "\n")
    with torch.no_grad():
        # T5
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        t5_out = {
            "input_ids": batch.input_ids.to(torch.int32).numpy(),
            "attention_mask": batch.attention_mask.to(torch.int32).numpy(),
            "hidden": t5(**batch).last_hidden_state.numpy(),
        }
        for i, prompt in enumerate(PROMPTS):
            one = tokenizer([prompt], return_tensors="pt")
            t5_out[f"ids_{i}"] = one.input_ids.to(torch.int32).numpy()
            t5_out[f"hidden_{i}"] = t5(**one).last_hidden_state.numpy()
        np.savez(expected / "t5.npz", **t5_out)

        np.savez(expected / "encodec.npz", **encodec_expected(encodec, gen))

        # decoder, teacher-forced
        pair = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
        dec_ids = torch.randint(0, 2048, (2 * 4, 8), generator=gen)
        dec_ids[:, 0] = 2048
        logits = mono(**pair, decoder_input_ids=dec_ids).logits
        np.savez(
            expected / "decoder.npz",
            input_ids=pair.input_ids.to(torch.int32).numpy(),
            attention_mask=pair.attention_mask.to(torch.int32).numpy(),
            decoder_input_ids=dec_ids.to(torch.int32).numpy(),
            logits=logits.numpy(),
        )

        # greedy CFG generation
        gen_out = {"batch_input_ids": pair.input_ids.to(torch.int32).numpy()}
        gen_out["batch_attention_mask"] = pair.attention_mask.to(torch.int32).numpy()
        gen_out["batch_tokens"], gen_out["batch_audio"] = greedy(mono, 40, **pair)
        single = tokenizer(PROMPTS[:1], return_tensors="pt")
        gen_out["single_input_ids"] = single.input_ids.to(torch.int32).numpy()
        gen_out["single_tokens"], gen_out["single_audio"] = greedy(mono, 40, **single)
        long = tokenizer(PROMPTS[1:2], return_tensors="pt")
        gen_out["long_tokens"], _ = greedy(mono, 253, **long)
        np.savez(expected / "generate.npz", **gen_out)

        # audio-prompt continuation
        t = torch.arange(16000, dtype=torch.float64) / 32000
        prompt_audio = (0.5 * torch.sin(2 * torch.pi * 440 * t) * torch.exp(-3 * t)).float()[
            None, None
        ]
        prompt_codes = mono.audio_encoder.encode(prompt_audio).audio_codes[0]
        tokens, audio = greedy(mono, 20, input_values=prompt_audio, **single)
        np.savez(
            expected / "continuation.npz",
            input_ids=single.input_ids.to(torch.int32).numpy(),
            prompt_audio=prompt_audio.numpy(),
            prompt_codes=prompt_codes.to(torch.int32).numpy(),
            tokens=tokens,
            audio=audio,
        )

        # stereo
        s_dec = torch.randint(0, 2048, (8, 4), generator=gen)
        s_dec[:, 0] = 2048
        s_logits = stereo(**single, decoder_input_ids=s_dec).logits
        tokens, audio = greedy(stereo, 30, **single)
        np.savez(
            expected / "stereo.npz",
            input_ids=single.input_ids.to(torch.int32).numpy(),
            tokens=tokens,
            audio=audio,
            decoder_input_ids=s_dec.to(torch.int32).numpy(),
            logits=s_logits.numpy(),
        )

    # melody: same T5/EnCodec, its own decoder and chroma projection; fp16-exact values saved as fp16
    # safetensors (last, so that every earlier draw from `gen` and so every earlier file stays as it was)
    melody = with_mono_codecs(MusicgenMelodyForConditionalGeneration(melody_config()), mono, gen)
    melody_dir = out / "tiny-musicgen-melody"
    melody.save_pretrained(melody_dir)
    weights = melody_dir / "model.safetensors"
    save_file(half(load_file(weights)), weights, metadata={"format": "pt"})
    config = json.loads((melody_dir / "config.json").read_text())
    config["dtype"] = "float16"  # what the weights are stored as
    (melody_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(mono_dir / name, melody_dir / name)
    MusicgenMelodyFeatureExtractor().save_pretrained(
        melody_dir
    )  # the chroma settings, as published
    with torch.no_grad():
        np.savez(expected / "melody.npz", **melody_expected(melody, tokenizer, gen))

    # more modes against transformers (no draws from `gen`): a stereo model continuing a stereo
    # prompt, and a batch of two prompts of different lengths continuing two audio prompts
    with torch.no_grad():
        left, right = decaying_tone(440), decaying_tone(660)
        modes = {"left": left.numpy(), "right": right.numpy()}
        stereo_prompt = torch.stack([left, right])[None]  # (1, 2, samples)
        modes["stereo_tokens"], modes["stereo_audio"] = greedy(
            stereo, 20, input_values=stereo_prompt, **single
        )
        pair_prompts = torch.stack([left, right])[:, None]  # (2, 1, samples)
        modes["batch_tokens"], modes["batch_audio"] = greedy(
            mono, 12, input_values=pair_prompts, **pair
        )
        np.savez(expected / "modes.npz", **modes)


#: The versions that made the committed fixtures (see the module docstring).
PINNED = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "tokenizers": "0.23.3",
    "sentencepiece": "0.2.3",
    "protobuf": "7.36.2",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "torchaudio": "2.11.0",
}


def version_drift() -> list[str]:
    """'name installed (fixtures: pinned)' for each installed version that differs from PINNED."""
    from importlib.metadata import PackageNotFoundError, version

    drift = []
    for name, pinned in PINNED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:  # torch's local tag (+cpu) does not count
            drift.append(f"{name} {installed} (fixtures: {pinned})")
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "tests" / "fixtures"
    )
    parser.add_argument(
        "--check", action="store_true", help="regenerate into a temp dir and compare bytes"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    drift = version_drift()
    if drift:
        print(
            "warning: not the versions that made the committed fixtures, so the output may not be "
            "byte-identical: " + ", ".join(drift),
            file=sys.stderr,
        )
    if not args.check:
        build(args.out)
        print(f"wrote {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        cmp = filecmp.dircmp(tmp, args.out)
        bad = []

        def walk(c, prefix=""):
            bad.extend(prefix + n for n in c.diff_files + c.left_only + c.right_only)
            for name, sub in c.subdirs.items():
                walk(sub, f"{prefix}{name}/")

        walk(cmp)
        # dircmp compares shallowly by stat; compare contents explicitly
        for f in Path(tmp).rglob("*"):
            if f.is_file():
                other = args.out / f.relative_to(tmp)
                if other.exists() and f.read_bytes() != other.read_bytes():
                    bad.append(str(f.relative_to(tmp)))
        if bad:
            sys.exit(f"fixtures differ: {sorted(set(bad))}")
        print("fixtures are byte-identical")


if __name__ == "__main__":
    main()
