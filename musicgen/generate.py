"""Delay pattern, sampling (temperature, top-k, top-p) and the autoregressive generation loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import mlx.core as mx
from tqdm import tqdm

from musicgen.model import MusicgenDecoder


def steps_for_duration(duration: float, frame_rate: float, delays: Sequence[int]) -> int:
    """Decoder steps that produce `duration` seconds: round(duration * frame_rate) + max delay."""
    return round(duration * frame_rate) + max(delays)


def num_frames(max_steps: int, delays: Sequence[int]) -> int:
    """Audio frames produced by `max_steps` decoder steps (e.g. 300 steps, delays 0..3 -> 297 frames)."""
    return max_steps - max(delays)


def build_delay_pattern(codes: mx.array, delays: Sequence[int], pad: int) -> mx.array:
    """Codes (batch, codebooks, frames) -> delayed (batch, codebooks, frames + max delay), codebook q shifted
    right by delays[q] and padded with `pad`."""
    b, _, frames = codes.shape
    width = frames + max(delays)
    rows = []
    for q, d in enumerate(delays):
        left = mx.full((b, d), pad, dtype=codes.dtype)
        right = mx.full((b, width - frames - d), pad, dtype=codes.dtype)
        rows.append(mx.concatenate([left, codes[:, q], right], axis=-1))
    return mx.stack(rows, axis=1)


def undo_delay_pattern(delayed: mx.array, delays: Sequence[int]) -> mx.array:
    """Inverse of build_delay_pattern: (batch, codebooks, steps) -> (batch, codebooks, steps - max delay)."""
    frames = delayed.shape[-1] - max(delays)
    return mx.stack([delayed[:, q, d : d + frames] for q, d in enumerate(delays)], axis=1)


def delay_valid_mask(max_steps: int, delays: Sequence[int]) -> mx.array:
    """Bool (max_steps, codebooks): True where step s generates a real token of codebook q, else padding."""
    frames = num_frames(max_steps, delays)
    steps = mx.arange(max_steps)[:, None]
    d = mx.array(list(delays))[None, :]
    return (steps >= d) & (steps < d + frames)


def sample(
    logits: mx.array,
    key: mx.array | None = None,
    *,
    top_k: int = 250,
    top_p: float = 0.0,
    temperature: float = 1.0,
) -> mx.array:
    """Draw one token per row of logits (rows, vocab) -> int32 (rows,).

    transformers' order: temperature, then top-k (exactly k candidates), then top-p (nucleus over what is
    left). top_k=1 or temperature=0 is greedy argmax; top_k=0 keeps every token; top_p of 0 or >= 1 is off.
    """
    if top_k == 1 or temperature <= 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    index = None
    if 0 < top_k < logits.shape[-1]:
        index = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
        logits = mx.take_along_axis(logits, index, axis=-1)
    if 0.0 < top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        logits = mx.take_along_axis(logits, order, axis=-1)
        index = order if index is None else mx.take_along_axis(index, order, axis=-1)
        probs = mx.softmax(logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        logits = mx.where(before < top_p, logits, -mx.inf)
    choice = mx.random.categorical(logits, axis=-1, key=key)
    if index is not None:
        choice = mx.take_along_axis(index, choice[..., None], axis=-1)[..., 0]
    return choice.astype(mx.int32)


def with_unconditional_rows(states: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """The classifier-free guidance batch: the rows, then as many rows with zero states and mask."""
    return (
        mx.concatenate([states, mx.zeros_like(states)], axis=0),
        mx.concatenate([mask, mx.zeros_like(mask)], axis=0),
    )


def null_chroma(batch: int, frames: int, num_chroma: int) -> mx.array:
    """Melody's "no melody" chroma (batch, frames, num_chroma): every frame on bin 0, as transformers."""
    return mx.zeros((batch, frames, num_chroma)).at[..., 0].add(1.0)


def melody_prefix(
    decoder: MusicgenDecoder,
    encoder_states: mx.array | None,
    encoder_mask: mx.array | None,
    chroma: mx.array | None,
    cfg: bool,
) -> mx.array:
    """Melody's conditioning prefix for the rows (and, with `cfg`, their unconditional rows: zero
    text, null chroma of the same length). No chroma: the null chroma of one frame (transformers)."""
    c = decoder.config
    if encoder_states is None and chroma is None:
        raise ValueError("a Melody model is conditioned on text states, a chroma or both")
    batch = encoder_states.shape[0] if encoder_states is not None else chroma.shape[0]
    null = null_chroma(batch, 1 if chroma is None else chroma.shape[1], c.num_chroma)
    chroma = null if chroma is None else chroma.astype(mx.float32)
    if chroma.shape[0] != batch:  # one melody for every prompt
        chroma = mx.repeat(chroma, batch // chroma.shape[0], axis=0)
    if cfg:
        chroma = mx.concatenate([chroma, null], axis=0)
        if encoder_states is not None:
            encoder_states, encoder_mask = with_unconditional_rows(encoder_states, encoder_mask)
    return decoder.conditioning_prefix(encoder_states, encoder_mask, chroma)


def generate_tokens(
    decoder: MusicgenDecoder,
    encoder_states: mx.array,
    encoder_mask: mx.array | None,
    max_steps: int,
    *,
    top_k: int = 250,
    top_p: float = 0.0,
    temperature: float = 1.0,
    guidance_coef: float = 3.0,
    seed: int | None = None,
    progress: bool | None = None,
    callback: Callable[[int, int], None] | None = None,
    prompt: mx.array | None = None,
    chroma: mx.array | None = None,
) -> mx.array:
    """Generate int32 codes (batch, codebooks, max_steps - max delay) conditioned on text encoder states.

    Classifier-free guidance when guidance_coef > 1, as transformers: the batch is doubled (conditional
    rows, then unconditional rows with zero states and an all-zero mask) and logits = uncond + g * (cond -
    uncond). Each step does one `mx.async_eval`; the host only waits for the previous step's tokens.

    `prompt` (batch, codebooks, P) audio codes to continue, as transformers' `input_values`: bos + the
    delayed prompt go through the decoder in one prefill, its tail (the last q frames of codebook q) is
    kept, and `max_steps` new steps follow; the result (batch, codebooks, P + max_steps - max delay)
    starts with the prompt.

    Melody (a decoder without cross-attention): the text states (None: no text) and `chroma` (batch,
    frames, num_chroma; None: no melody) form a prefix of P positions (`melody_prefix`) that one
    prefill puts in the cache; the tokens follow at positions P.. (transformers' melody generate).
    """
    config = decoder.config
    delays = config.delays
    start = 0 if prompt is None else prompt.shape[-1]
    if max_steps <= max(delays):
        raise ValueError(f"max_steps must be > {max(delays)} (the largest codebook delay)")
    max_steps += start  # from here on: steps of the whole delayed sequence, prompt included
    cfg = guidance_coef is not None and guidance_coef > 1
    if encoder_states is not None and encoder_mask is None:
        encoder_mask = mx.ones(encoder_states.shape[:2], dtype=mx.int32)
    prefix = None
    if not config.cross_attention:
        prefix = melody_prefix(decoder, encoder_states, encoder_mask, chroma, cfg)
        cross = decoder.cross_states(None)
    elif chroma is not None:
        raise ValueError("this model has no melody conditioning (a MusicGen-Melody model has)")
    else:
        if cfg:
            encoder_states, encoder_mask = with_unconditional_rows(encoder_states, encoder_mask)
        cross = decoder.cross_states(encoder_states, encoder_mask)
    held = 0 if prefix is None else prefix.shape[1]  # positions before the first token
    if held + max_steps > config.max_position_embeddings:
        raise ValueError(
            f"{'conditioning + ' if held else ''}prompt + max_steps = {held + max_steps} > the "
            f"model's {config.max_position_embeddings} positions"
        )
    rows = prefix.shape[0] if prefix is not None else encoder_states.shape[0]
    batch = rows // 2 if cfg else rows
    k = config.num_codebooks
    pad = config.pad_token_id

    # Setup: everything that does not change per step.
    cache = decoder.make_cache(rows, held + max_steps)
    valid = delay_valid_mask(max_steps, delays)
    fill = mx.full((max_steps, batch, k), pad, dtype=mx.int32)  # value of each token not generated
    if prompt is not None:
        known = build_delay_pattern(prompt.astype(mx.int32), delays, pad).transpose(2, 0, 1)
        fill[: known.shape[0]] = known
        valid = valid & (mx.arange(max_steps)[:, None] >= mx.array(delays)[None, :] + start)
    greedy = top_k == 1 or temperature <= 0
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    keys = None if greedy else mx.random.split(mx.random.key(seed), max_steps)
    mx.eval(cross.kv, [(c.keys, c.values) for c in cache], valid, fill)
    if keys is not None:
        mx.eval(keys)

    tokens = mx.full((rows, k), config.bos_token_id, dtype=mx.int32)  # the next step's input
    outputs = []
    if start:
        # prefill: [the prefix,] bos and the delayed prompt up to position start - 1, in one forward
        outputs = [fill[s] for s in range(start)]
        known = fill[: start - 1].transpose(1, 2, 0)
        known = mx.concatenate([known, known], axis=0) if cfg else known
        decoder(mx.concatenate([tokens[..., None], known], axis=-1), cross, cache, 0, prefix)
        tokens = mx.concatenate([outputs[-1]] * 2, axis=0) if cfg else outputs[-1]
        mx.eval(tokens, [(c.keys, c.values) for c in cache])
    elif prefix is not None:  # prefill: the conditioning prefix
        decoder(None, cross, cache, 0, prefix)
        mx.eval([(c.keys, c.values) for c in cache])
    step_fn = decoder.token_step(cross, cache)  # compiled single-token step, parameters gathered
    show = max_steps - start >= 100 if progress is None else progress
    bar = tqdm(total=max_steps - start, unit="step", disable=not show, leave=False)
    try:
        for step in range(start, max_steps):
            logits = step_fn(tokens, held + step)  # attention reads the filled cache only
            if cfg:
                cond, uncond = logits[:batch], logits[batch:]
                logits = uncond + (cond - uncond) * guidance_coef
            key = None if keys is None else keys[step]
            nxt = sample(
                logits.reshape(batch * k, -1),
                key,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
            )
            nxt = mx.where(valid[step], nxt.reshape(batch, k), fill[step])
            tokens = mx.concatenate([nxt, nxt], axis=0) if cfg else nxt
            mx.async_eval(tokens)
            if outputs:
                mx.eval(outputs[-1])  # pace the host one step behind the device
            outputs.append(nxt)
            bar.update(1)
            if callback is not None:
                callback(step + 1 - start, max_steps - start)
    finally:
        bar.close()
    return undo_delay_pattern(mx.stack(outputs, axis=-1), delays)


def sliding_windows(
    total: int, prompt: int, window: int, stride: int
) -> list[tuple[int, int, int]]:
    """audiocraft's extension plan for `total` frames: (offset, context, length) of each window.

    Window i covers frames offset..offset + length (length <= window) and continues its first `context`
    frames (the audio prompt, then the last window - stride frames of the previous window).
    """
    if not 0 < stride < window:
        raise ValueError(f"the stride ({stride} frames) must be in (0, window = {window} frames)")
    if prompt >= window:
        raise ValueError(f"the audio prompt ({prompt} frames) must be shorter than the window")
    plan, offset, context = [], 0, prompt
    while offset + context < total:
        length = min(total - offset, window)
        plan.append((offset, context, length))
        offset, context = offset + stride, length - stride
    return plan


def generate_long(
    decoder: MusicgenDecoder,
    encoder_states: mx.array,
    encoder_mask: mx.array | None,
    frames: int,
    *,
    window: int,
    stride: int,
    prompt: mx.array | None = None,
    chroma: mx.array | Callable[[int], mx.array] | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    callback: Callable[[int, int], None] | None = None,
    **sampling,
) -> mx.array:
    """`frames` new frames beyond `window` with audiocraft's sliding window -> (batch, codebooks, P + frames).

    The first window generates `window` frames (after the audio prompt of P frames, if any); each next one
    starts `stride` frames later and continues the last window - stride frames generated so far with the
    same conditioning. Memory is bounded by the window; one progress bar and one callback stream
    (steps done, total steps) cover every window. Window i is seeded with seed + i * 0x9E3779B9 (mod 2**64).
    Melody: `chroma` is the same for every window, or a function of the window's first frame giving
    its chroma (audiocraft conditions each window on the melody's matching stretch).
    """
    delay = max(decoder.config.delays)
    start = 0 if prompt is None else prompt.shape[-1]
    plan = sliding_windows(start + frames, start, window, stride)
    total = sum(length - context + delay for _, context, length in plan)
    chunks = [] if prompt is None else [prompt]
    done = 0
    show = total >= 100 if progress is None else progress
    bar = tqdm(total=total, unit="step", disable=not show, leave=False)

    def step(n: int, _: int) -> None:
        bar.update(1)
        if callback is not None:
            callback(done + n, total)

    try:
        for i, (offset, context, length) in enumerate(plan):
            out = generate_tokens(
                decoder,
                encoder_states,
                encoder_mask,
                length - context + delay,
                prompt=prompt,
                chroma=chroma(offset) if callable(chroma) else chroma,
                seed=None if seed is None else (seed + i * 0x9E3779B9) % 2**64,
                progress=False,
                callback=step,
                **sampling,
            )
            chunks.append(out[..., context:])
            prompt = out[..., stride:]
            mx.eval(chunks[-1], prompt)
            done += length - context + delay
    finally:
        bar.close()
    return mx.concatenate(chunks, axis=-1)
