"""The public `MusicGen` class: text -> codes -> audio."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from encodec.encodec import EncodecConfig, EncodecModel
from musicgen.chroma import chroma_features
from musicgen.generate import generate_long, generate_tokens, steps_for_duration
from musicgen.model import (
    MusicgenDecoder,
    MusicgenDecoderConfig,
    quantize_decoder,
    weights_quantizer,
)
from musicgen.weights import load_converted
from t5.t5 import T5Config, T5Encoder
from t5.tokenizer import T5Tokenizer

# transformers' defaults when generation_config.json is absent (MusicGen's published values)
GENERATION_DEFAULTS = {"top_k": 250, "top_p": 0.0, "temperature": 1.0, "guidance_coef": 3.0}


def default_dtype() -> mx.Dtype:
    """float16 on a GPU, float32 on the CPU."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


#: transformers' MusicgenMelodyFeatureExtractor defaults (the published preprocessor_config.json's values)
CHROMA_DEFAULTS = {"n_fft": 16384, "hop_length": 4096, "sampling_rate": 32000, "chunk_length": 30}


def read_chroma_config(folder: Path | None = None) -> dict:
    """Melody's chroma settings (chroma_features' keywords) from a checkpoint's preprocessor_config.json;
    transformers' defaults where it or a value is missing."""
    path = None if folder is None else folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path is not None and path.exists() else {}
    c = {k: pre.get(k, v) for k, v in CHROMA_DEFAULTS.items()}
    return {
        "n_fft": int(c["n_fft"]),
        "hop_length": int(c["hop_length"]),
        "target_rate": int(c["sampling_rate"]),
        "max_seconds": float(c["chunk_length"]),
    }


def read_generation_config(folder: Path) -> dict:
    """Sampling defaults from generation_config.json (top_k, top_p, temperature, guidance, max_length)."""
    out = dict(GENERATION_DEFAULTS)
    path = folder / "generation_config.json"
    if not path.exists():
        return out
    gc = json.loads(path.read_text())
    if gc.get("top_k") is not None:
        out["top_k"] = int(gc["top_k"])
    if gc.get("top_p") is not None and float(gc["top_p"]) < 1.0:
        out["top_p"] = float(gc["top_p"])
    if gc.get("temperature") is not None:
        out["temperature"] = float(gc["temperature"])
    if gc.get("guidance_scale") is not None:
        out["guidance_coef"] = float(gc["guidance_scale"])
    if gc.get("do_sample") is False:
        out["top_k"] = 1
    if gc.get("max_length") is not None:
        out["max_length"] = int(gc["max_length"])
    return out


class MusicGen:
    """Text-to-music: T5 text encoder, MusicGen decoder, EnCodec audio decoder."""

    def __init__(
        self,
        config: dict,
        tokenizer: T5Tokenizer,
        text_encoder: T5Encoder,
        decoder: MusicgenDecoder,
        audio_encoder: EncodecModel,
        generation_config: dict | None = None,
        chroma_config: dict | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.audio_encoder = audio_encoder
        self.generation_config = {**GENERATION_DEFAULTS, **(generation_config or {})}
        self.chroma_config = chroma_config or read_chroma_config()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "facebook/musicgen-small",
        *,
        dtype: mx.Dtype | None = None,
        revision: str | None = None,
        quantize: int | None = None,
        kv_dtype: mx.Dtype | None = None,
        progress: bool = True,
    ) -> MusicGen:
        """Load a MusicGen checkpoint (hub repo id or local folder).

        `dtype` is the decoder's (None: float16 on GPU, float32 on CPU); T5 and EnCodec stay float32.
        `quantize` (4 or 8) quantizes the decoder's linear layers to that many bits. `kv_dtype`: the
        generation's self-attention K/V cache (None: the decoder's dtype); mx.float16 with a float32
        decoder halves the cache (and what late steps read) at a small cost in precision.
        """
        dtype = default_dtype() if dtype is None else dtype
        config, weights = load_converted(
            model,
            revision=revision,
            dtype=dtype,
            quantize=quantize,
            sanitizers={
                "text_encoder": T5Encoder.sanitize,
                "audio_encoder": EncodecModel.sanitize,
                "decoder": MusicgenDecoder.sanitize,
            },
            quantizer=None if quantize is None else weights_quantizer(quantize),
            progress=progress,
        )
        folder = Path(config["_converted_path"])
        tokenizer = T5Tokenizer.from_pretrained(folder)
        text_encoder = T5Encoder(T5Config.from_dict(config["text_encoder"]))
        text_encoder.load_weights(list(weights["text_encoder"].items()), strict=True)
        text_encoder.eval()
        audio_encoder = EncodecModel(EncodecConfig.from_dict(config["audio_encoder"]))
        audio_encoder.load_weights(list(weights["audio_encoder"].items()), strict=True)
        decoder = MusicgenDecoder(MusicgenDecoderConfig.from_dict(config))
        if quantize is not None:
            quantize_decoder(decoder, quantize, only=weights["decoder"])
        decoder.load_weights(list(weights["decoder"].items()), strict=True)
        decoder.kv_dtype = kv_dtype
        mx.eval(text_encoder.parameters(), audio_encoder.parameters(), decoder.parameters())
        return cls(
            config,
            tokenizer,
            text_encoder,
            decoder,
            audio_encoder,
            read_generation_config(folder),
            read_chroma_config(folder) if decoder.config.num_chroma else None,
        )

    @property
    def decoder_config(self) -> MusicgenDecoderConfig:
        return self.decoder.config

    @property
    def sampling_rate(self) -> int:
        return self.audio_encoder.sampling_rate

    @property
    def frame_rate(self) -> int:
        return self.audio_encoder.frame_rate

    @property
    def num_codebooks(self) -> int:
        return self.decoder.config.num_codebooks

    @property
    def audio_channels(self) -> int:
        return self.decoder.config.audio_channels

    @property
    def is_melody(self) -> bool:
        """True for MusicGen-Melody checkpoints (conditioned on a melody's chroma as well as text)."""
        return not self.decoder.config.cross_attention

    @property
    def max_steps(self) -> int:
        """The most decoder steps one generation may take (the decoder's position table, less
        Melody's chroma prefix; a Melody prompt's text tokens take positions too)."""
        return self.decoder.config.max_steps

    def prefix_positions(self, prompts: str | list[str | None] | None) -> int:
        """Decoder positions Melody's conditioning takes before the first token for these prompts
        (chroma_length + their padded text length; 0 for MusicGen)."""
        if not self.is_melody:
            return 0
        texts = [prompts] if prompts is None or isinstance(prompts, str) else list(prompts)
        if all(not t for t in texts):
            return self.decoder.config.chroma_length + 1  # one zero text state
        ids, _ = self.tokenizer.encode([t or "" for t in texts])
        return self.decoder.config.chroma_length + ids.shape[1]

    def steps_for(self, duration: float) -> int:
        """Decoder steps for `duration` seconds of audio."""
        return steps_for_duration(duration, self.frame_rate, self.decoder.config.delays)

    @property
    def max_duration(self) -> float:
        """The model's window in seconds (generation_config max_length / frame rate: 30 s for MusicGen)."""
        return self.generation_config.get("max_length", 1500) / self.frame_rate

    def encode_text(self, prompts: list[str | None]) -> tuple[mx.array, mx.array]:
        """T5 states (batch, len, d_model) and the attention mask of a batch of prompts.

        Empty prompts ("" or None) are unconditional rows: an all-zero mask (so zero cross-attention),
        like transformers' get_unconditional_inputs.
        """
        empty = [not p for p in prompts]
        if all(empty):
            width = self.text_encoder.config.d_model
            return mx.zeros((len(prompts), 1, width)), mx.zeros((len(prompts), 1), mx.int32)
        ids, mask = self.tokenizer.encode([p or "" for p in prompts])
        if any(empty):
            mask = mask * mx.array([[0] if e else [1] for e in empty], dtype=mask.dtype)
        return self.text_encoder(ids, mask), mask

    def encode_audio(self, audio) -> mx.array:
        """Audio at `sampling_rate` -> int32 codes (batch, num_codebooks, ceil(samples / hop)).

        `audio` is (samples,), (samples, channels) or (batch, samples, channels). A mono model mixes the
        channels down; a stereo model duplicates a mono input (more than 2 channels: mixed down first),
        encodes left and right separately and interleaves their codebooks L0 R0 L1 R1 ... (transformers).
        """
        a = mx.array(audio).astype(mx.float32)
        a = a.reshape(1, -1, 1) if a.ndim == 1 else a[None] if a.ndim == 2 else a
        if a.ndim != 3 or a.shape[1] == 0:
            raise ValueError(f"expected (samples, channels) audio, got shape {tuple(a.shape)}")
        if a.shape[-1] > a.shape[1]:
            raise ValueError(
                f"expected (samples, channels) audio, got shape {tuple(a.shape)}: more channels than "
                "samples (channels-first audio needs transposing)"
            )
        if self.audio_channels == 1 or a.shape[-1] > 2:
            a = a.mean(axis=-1, keepdims=True) if a.shape[-1] > 1 else a
        if self.audio_channels == 1:
            return self.audio_encoder.encode(a)
        left = self.audio_encoder.encode(a[..., :1])
        right = self.audio_encoder.encode(a[..., -1:])
        b, k, frames = left.shape
        return mx.stack([left, right], axis=2).reshape(b, 2 * k, frames)

    def encode_melody(self, melody, sampling_rate: int | None = None) -> mx.array:
        """Melody audio -> one-hot chroma (batch, frames, 12) for a MusicGen-Melody model.

        `melody` is (samples,), (samples, channels), (batch, samples, channels) or a list of clips
        (a batch; shorter ones are zero-padded) at `sampling_rate` (default the model's); see
        musicgen.chroma (transformers' MusicgenMelodyFeatureExtractor).
        """
        if not self.is_melody:
            raise ValueError("this model takes no melody: use a MusicGen-Melody checkpoint")
        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        clips = _clips(melody)
        num_chroma = self.decoder.config.num_chroma
        return mx.array(chroma_features(clips, rate, num_chroma=num_chroma, **self.chroma_config))

    def _melody_windows(
        self, melody, sampling_rate: int | None, window: int, first: mx.array | None = None
    ):
        """The chroma of each sliding window, by its first frame: the melody's matching stretch of
        `window` frames, looped when shorter (audiocraft); the first window takes the melody as is
        (`first`: its chroma, when computed already)."""
        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        first = self.encode_melody(melody, rate) if first is None else first
        clips = _clips(melody)

        def chroma_at(offset: int) -> mx.array:
            if offset == 0:
                return first
            start = round(offset / self.frame_rate * rate)
            span = np.arange(start, start + round(window / self.frame_rate * rate))
            return self.encode_melody([np.take(c, span, axis=0, mode="wrap") for c in clips], rate)

        return chroma_at

    def generate_tokens(
        self,
        prompts: str | list[str | None] | None = None,
        max_steps: int | None = None,
        *,
        duration: float | None = None,
        audio_prompt=None,
        melody=None,
        melody_sampling_rate: int | None = None,
        include_prompt: bool = True,
        extend_stride: float = 18.0,
        window_duration: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        guidance_coef: float | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """Audio codes int32 (batch, num_codebooks, frames).

        Length: `max_steps` new decoder steps in one pass (frames = max_steps - max codebook delay), or
        `duration` seconds of new audio (not both: ValueError): beyond the model's window (`window_duration`, default
        max_duration = 30 s) audiocraft's sliding window continues the last window - `extend_stride`
        seconds with the same text. Neither: generation_config's max_length (the prompt included).

        `prompts` None or "" generates unconditionally (guidance off, as transformers). `audio_prompt`
        (see encode_audio) is continued; the result starts with its frames unless include_prompt=False.
        `melody` (MusicGen-Melody only; see encode_melody) at `melody_sampling_rate` (default the
        model's) conditions on its chroma, with or without text.
        """
        if max_steps is not None and duration is not None:
            raise ValueError("give max_steps or duration, not both")
        codes = None if audio_prompt is None else self.encode_audio(audio_prompt)
        chroma = None if melody is None else self.encode_melody(melody, melody_sampling_rate)
        texts = [prompts] if prompts is None or isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError(
                "no prompts: give a prompt, a list of prompts, or None (unconditional)"
            )
        texts, codes, chroma = _one_batch(texts, codes, chroma)
        start = 0 if codes is None else codes.shape[-1]
        gc = self.generation_config
        sampling = _check_sampling(
            top_k=gc["top_k"] if top_k is None else top_k,
            top_p=gc["top_p"] if top_p is None else top_p,
            temperature=gc["temperature"] if temperature is None else temperature,
            guidance_coef=gc["guidance_coef"] if guidance_coef is None else guidance_coef,
        )
        no_text = all(not t for t in texts)
        if no_text and chroma is None:
            sampling["guidance_coef"] = 1.0  # both CFG halves would be the same unconditional rows
        states, mask = self.encode_text(texts)  # no text: one zero state (transformers' too)
        delay = max(self.decoder.config.delays)
        limit = self.decoder.config.max_position_embeddings - self.prefix_positions(texts)
        if max_steps is None and duration is not None:
            frames = round(duration * self.frame_rate)
            window = int((window_duration or self.max_duration) * self.frame_rate)
            if start + frames > window:
                if window + delay > limit:
                    raise ValueError(f"a window of {window} frames exceeds {limit} steps")
                tokens = generate_long(
                    self.decoder,
                    states,
                    mask,
                    frames,
                    window=window,
                    stride=int(extend_stride * self.frame_rate),
                    prompt=codes,
                    seed=seed,
                    progress=progress,
                    callback=callback,
                    chroma=None
                    if melody is None
                    else self._melody_windows(melody, melody_sampling_rate, window, chroma),
                    **sampling,
                )
                return tokens if include_prompt else tokens[..., start:]
            max_steps = frames + delay
        elif max_steps is None:
            max_steps = gc.get("max_length", 1500) - 1 - start
            if max_steps <= delay:
                raise ValueError(
                    f"the audio prompt's {start} frames fill the model's {gc.get('max_length', 1500)}-"
                    "frame window: give `duration` to continue it with the sliding window"
                )
        if start + max_steps > limit:
            raise ValueError(
                f"prompt + max_steps = {start + max_steps} exceeds the model's maximum "
                f"{limit} steps: give `duration` for longer music (sliding window)"
            )
        tokens = generate_tokens(
            self.decoder,
            states,
            mask,
            max_steps,
            prompt=codes,
            seed=seed,
            progress=progress,
            callback=callback,
            chroma=chroma,
            **sampling,
        )
        return tokens if include_prompt else tokens[..., start:]

    def decode_tokens(self, tokens: mx.array) -> mx.array:
        """Codes (batch, num_codebooks, frames) -> float32 audio (batch, frames * hop, channels)."""
        if self.audio_channels == 2:  # stereo codebooks interleave left/right
            left = self.audio_encoder.decode(tokens[:, 0::2])
            right = self.audio_encoder.decode(tokens[:, 1::2])
            return mx.concatenate([left, right], axis=-1)
        return self.audio_encoder.decode(tokens)

    def generate(
        self,
        prompts: str | list[str | None] | None = None,
        max_steps: int | None = None,
        *,
        duration: float | None = None,
        audio_prompt=None,
        **kwargs,
    ) -> mx.array:
        """Audio for one prompt (samples, channels) or a list of prompts (batch, samples, channels).

        Give `max_steps` (decoder steps) or `duration` (seconds), not both; keyword arguments as
        generate_tokens.
        One clip (no batch axis) for a str or None prompt, unless the audio prompt or the melody is a
        batch (a (batch, samples, channels) array; a melody also a list of clips).
        """
        tokens = self.generate_tokens(
            prompts, max_steps, duration=duration, audio_prompt=audio_prompt, **kwargs
        )
        audio = self.decode_tokens(tokens)
        mx.eval(audio)
        batched = not (prompts is None or isinstance(prompts, str))
        batched |= any(_is_batch(x) for x in (audio_prompt, kwargs.get("melody")))
        return audio if batched else audio[0]


def _is_batch(audio) -> bool:
    """A list of clips or a (batch, samples, channels) array."""
    return isinstance(audio, (list, tuple)) or getattr(audio, "ndim", 0) == 3


def _check_sampling(**sampling) -> dict:
    """The sampling settings, or ValueError for one out of range."""
    if not (isinstance(sampling["top_k"], int) and sampling["top_k"] >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: every token), got {sampling['top_k']!r}")
    if not 0.0 <= sampling["top_p"] <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0: off), got {sampling['top_p']!r}")
    if not sampling["temperature"] >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {sampling['temperature']!r}")
    if not sampling["guidance_coef"] >= 0.0:
        raise ValueError(f"guidance_coef must be >= 0, got {sampling['guidance_coef']!r}")
    return sampling


def _numpy(audio) -> np.ndarray:
    return np.asarray(audio.astype(mx.float32) if isinstance(audio, mx.array) else audio)


def _clips(audio) -> list[np.ndarray]:
    """A clip, a (batch, samples, channels) array or a list of clips -> a list of numpy clips."""
    if isinstance(audio, (list, tuple)):
        return [_numpy(c) for c in audio]
    a = _numpy(audio)
    return list(a) if a.ndim == 3 else [a]


def _one_batch(
    texts: list, codes: mx.array | None, chroma: mx.array | None
) -> tuple[list, mx.array | None, mx.array | None]:
    """Prompts, audio prompts and melodies brought to one batch size: any of them given once is
    repeated to the others' count."""
    n = max([len(texts)] + [x.shape[0] for x in (codes, chroma) if x is not None])
    for x, what in ((codes, "audio prompts"), (chroma, "melodies")):
        if x is not None and {len(texts), x.shape[0]} - {1, n}:
            raise ValueError(f"{len(texts)} prompts but {x.shape[0]} {what}")

    def repeat(x: mx.array | None) -> mx.array | None:
        return x if x is None or x.shape[0] == n else mx.repeat(x, n, axis=0)

    return texts * (n // len(texts)), repeat(codes), repeat(chroma)
