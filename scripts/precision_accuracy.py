"""How far each decoder precision option is from float32: logits and greedy tokens.

    uv run python scripts/precision_accuracy.py                      # random-weight musicgen-small
    uv run python scripts/precision_accuracy.py --model tests/fixtures/tiny-musicgen --options float16 bfloat16
    uv run python scripts/precision_accuracy.py --options 8 float16+8 --frames 100 --json

Each option (a dtype, `8` / `4` for quantized float32 linears, or `float16+8` ...) is loaded from the same checkpoint
as the float32 reference, through a private conversion cache, and compared with it:
- logits: the decoder's logits of both CFG rows, teacher-forced on float32's greedy tokens (delay pattern and all):
  max |err| / max |ref|, and how many (row, codebook, position) argmaxes agree;
- greedy: CFG generation with top-k 1 (guidance 3): how many tokens equal float32's, and the first frame that
  differs (the continuation diverges from there, so this understates per-step accuracy).
float32 itself matches transformers (tests/test_decoder.py, tests/test_generate.py).
"""

# ruff: noqa: I001  (the import order below is deliberate)
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass

import musicgen  # noqa: F401  (first: it loads the BLAS, which must happen before mlx is imported)
import mlx.core as mx
import numpy as np

from apps import musicgen_bench
from musicgen import MusicGen
from musicgen.generate import build_delay_pattern, melody_prefix, with_unconditional_rows
from musicgen.weights import WeightsError

PROMPT = "80s pop track with bassy drums and synth"
DEFAULT_OPTIONS = ["float16", "bfloat16", "8", "4"]


def parse_option(option: str) -> tuple[str, int | None]:
    """'float16' -> ('float16', None), '8' -> ('float32', 8), 'bfloat16+4' -> ('bfloat16', 4)."""
    dtype, _, bits = option.rpartition("+")
    if bits.isdigit():
        return dtype or "float32", int(bits)
    return option, None


def load(model: str, option: str) -> MusicGen:
    dtype, bits = parse_option(option)
    return MusicGen.from_pretrained(model, dtype=getattr(mx, dtype), quantize=bits, progress=False)


def teacher_forced_logits(model: MusicGen, prompt: str, tokens: mx.array) -> np.ndarray:
    """Logits (2 CFG rows, codebooks, positions, vocab) in float32 of `tokens` (1, codebooks, positions)."""
    decoder = model.decoder
    states, mask = model.encode_text([prompt])
    rows = mx.concatenate([tokens, tokens])
    if model.is_melody:  # the conditioning prefix (no melody) first; keep the tokens' logits
        prefix = melody_prefix(decoder, states, mask, None, cfg=True)
        logits = decoder(rows, decoder.cross_states(None), None, 0, prefix)[:, :, prefix.shape[1] :]
    else:
        logits = decoder(rows, decoder.cross_states(*with_unconditional_rows(states, mask)))
    return np.array(logits.astype(mx.float32))


@dataclass
class Reference:
    """float32's greedy tokens, the tokens each of its steps was fed, and its logits of those."""

    prompt: str
    tokens: np.ndarray  # (1, codebooks, frames)
    inputs: mx.array  # (1, codebooks, steps): BOS, then the delay pattern of `tokens`
    logits: np.ndarray

    @classmethod
    def generate(cls, model: MusicGen, prompt: str, frames: int) -> Reference:
        config = model.decoder.config
        steps = frames + max(config.delays)  # the delay pattern's last frame needs its extra steps
        tokens = model.generate_tokens(prompt, steps, top_k=1, progress=False)
        delayed = build_delay_pattern(tokens, config.delays, config.pad_token_id)
        bos = mx.full((1, delayed.shape[1], 1), config.bos_token_id, mx.int32)
        inputs = mx.concatenate([bos, delayed], axis=-1)[:, :, :steps]
        logits = teacher_forced_logits(model, prompt, inputs)
        return cls(prompt, np.array(tokens), inputs, logits)


def compare(model: MusicGen, ref: Reference) -> dict:
    logits = teacher_forced_logits(model, ref.prompt, ref.inputs)
    steps = ref.inputs.shape[-1]
    tokens = np.array(model.generate_tokens(ref.prompt, steps, top_k=1, progress=False))
    differs = np.flatnonzero((tokens != ref.tokens).any(axis=(0, 1)))
    return {
        "logits_rel_err": float(np.abs(logits - ref.logits).max() / np.abs(ref.logits).max()),
        "argmax_agree": float((logits.argmax(-1) == ref.logits.argmax(-1)).mean()),
        "argmax_count": int(ref.logits[..., 0].size),
        "greedy_agree": float((tokens == ref.tokens).mean()),
        "greedy_count": int(ref.tokens.size),
        "first_differing_frame": int(differs[0]) if differs.size else None,
    }


def run(model: str, options: list[str], frames: int, prompt: str = PROMPT) -> dict:
    ref = Reference.generate(load(model, "float32"), prompt, frames)
    results = {}
    for option in options:
        results[option] = compare(load(model, option), ref)
        mx.clear_cache()
    return {"model": model, "prompt": prompt, "frames": frames, "options": results}


def print_table(report: dict) -> None:
    print(
        f"{report['model']}: against float32, {report['frames']} frames, prompt {report['prompt']!r}"
    )
    print(
        f"{'option':<14}{'logits max|err|/max|ref|':>26}{'argmax agree':>14}{'greedy agree':>14}  first diff"
    )
    for option, r in report["options"].items():
        first = "-" if r["first_differing_frame"] is None else f"frame {r['first_differing_frame']}"
        print(
            f"{option:<14}{r['logits_rel_err']:>26.2e}{100 * r['argmax_agree']:>13.1f}%"
            f"{100 * r['greedy_agree']:>13.1f}%  {first}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    musicgen_bench.add_model_arguments(parser)
    parser.add_argument(
        "--options",
        nargs="+",
        default=DEFAULT_OPTIONS,
        help="dtypes (float32, float16, bfloat16), bits (8, 4) or both (float16+8)",
    )
    parser.add_argument("--frames", type=int, default=50, help="frames of greedy CFG generation")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for option in args.options:
        dtype, bits = parse_option(option)
        if dtype not in ("float32", "float16", "bfloat16") or bits not in (None, 4, 8):
            parser.error(f"unknown option {option!r}")
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    if args.model is None:
        args.model = str(musicgen_bench.bench_checkpoint(args.shape))
    with tempfile.TemporaryDirectory(prefix="musicgen-precision-cache-") as cache:
        os.environ["MUSICGEN_MLX_CACHE"] = cache
        try:
            report = run(args.model, args.options, args.frames, args.prompt)
        except WeightsError as e:
            parser.exit(1, f"precision_accuracy: {e}\n")
        except KeyboardInterrupt:
            raise SystemExit(130) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
