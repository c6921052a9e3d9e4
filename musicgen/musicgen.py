"""The public `MusicGen` class: text -> codes -> audio."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from encodec.encodec import EncodecConfig, EncodecModel
from musicgen.generate import generate_tokens, steps_for_duration
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
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.audio_encoder = audio_encoder
        self.generation_config = {**GENERATION_DEFAULTS, **(generation_config or {})}

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "facebook/musicgen-small",
        *,
        dtype: mx.Dtype | None = None,
        revision: str | None = None,
        quantize: int | None = None,
        progress: bool = True,
    ) -> MusicGen:
        """Load a MusicGen checkpoint (hub repo id or local folder).

        `dtype` is the decoder's (None: float16 on GPU, float32 on CPU); T5 and EnCodec stay float32.
        `quantize` (4 or 8) quantizes the decoder's linear layers to that many bits.
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
        mx.eval(text_encoder.parameters(), audio_encoder.parameters(), decoder.parameters())
        return cls(
            config, tokenizer, text_encoder, decoder, audio_encoder, read_generation_config(folder)
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
    def max_steps(self) -> int:
        """The most decoder steps one generation may take (the decoder's position table)."""
        return self.decoder.config.max_position_embeddings

    def steps_for(self, duration: float) -> int:
        """Decoder steps for `duration` seconds of audio."""
        return steps_for_duration(duration, self.frame_rate, self.decoder.config.delays)

    def encode_text(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """T5 states (batch, len, d_model) and the attention mask of a batch of prompts."""
        ids, mask = self.tokenizer.encode(prompts)
        return self.text_encoder(ids, mask), mask

    def generate_tokens(
        self,
        prompts: str | list[str],
        max_steps: int | None = None,
        *,
        duration: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        guidance_coef: float | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """Audio codes int32 (batch, num_codebooks, frames); frames = max_steps - max codebook delay."""
        if isinstance(prompts, str):
            prompts = [prompts]
        gc = self.generation_config
        if max_steps is None:
            if duration is not None:
                max_steps = self.steps_for(duration)
            else:
                max_steps = gc.get("max_length", 1500) - 1
        if max_steps > self.max_steps:
            raise ValueError(f"max_steps {max_steps} exceeds the model's maximum {self.max_steps}")
        states, mask = self.encode_text(list(prompts))
        return generate_tokens(
            self.decoder,
            states,
            mask,
            max_steps,
            top_k=gc["top_k"] if top_k is None else top_k,
            top_p=gc["top_p"] if top_p is None else top_p,
            temperature=gc["temperature"] if temperature is None else temperature,
            guidance_coef=gc["guidance_coef"] if guidance_coef is None else guidance_coef,
            seed=seed,
            progress=progress,
            callback=callback,
        )

    def decode_tokens(self, tokens: mx.array) -> mx.array:
        """Codes (batch, num_codebooks, frames) -> float32 audio (batch, frames * hop, channels)."""
        if self.audio_channels == 2:  # stereo codebooks interleave left/right
            left = self.audio_encoder.decode(tokens[:, 0::2])
            right = self.audio_encoder.decode(tokens[:, 1::2])
            return mx.concatenate([left, right], axis=-1)
        return self.audio_encoder.decode(tokens)

    def generate(
        self,
        prompts: str | list[str],
        max_steps: int | None = None,
        *,
        duration: float | None = None,
        **kwargs,
    ) -> mx.array:
        """Audio for one prompt (samples, channels) or a list of prompts (batch, samples, channels).

        Give `max_steps` (decoder steps) or `duration` (seconds); keyword arguments as generate_tokens.
        """
        tokens = self.generate_tokens(prompts, max_steps, duration=duration, **kwargs)
        audio = self.decode_tokens(tokens)
        mx.eval(audio)
        return audio[0] if isinstance(prompts, str) else audio
