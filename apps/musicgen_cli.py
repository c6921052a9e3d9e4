"""musicgen-cli: text to music from the command line; also `convert` and `cache list|clear`.

    musicgen-cli --prompt "happy rock" --max-steps 300 --output happy_rock.wav
    musicgen-cli convert --model facebook/musicgen-small --dtype float16
    musicgen-cli cache list

Every flag is documented in docs/cli.md. Arguments are checked before anything heavy is imported; bad input
gets one `musicgen-cli: error: ...` line on stderr and a non-zero exit (2 for usage errors), Ctrl+C exits 130
after removing partial and temporary files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from apps import huge_pages

PROG = "musicgen-cli"
DEFAULT_MODEL = "facebook/musicgen-small"
DEFAULT_STEPS = 300
DEFAULT_STRIDE = 18.0  # seconds: audiocraft's extend_stride, for music longer than the window
MAX_DURATION = 3600.0  # seconds: longer requests are refused as a likely typo
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")  # musicgen.audio.FORMATS (not imported: it loads mlx)
NORMALIZE_STRATEGIES = ("none", "peak", "rms", "loudness")  # musicgen.audio.NORMALIZE_STRATEGIES
DEFAULT_LOUDNESS = -14.0
MAX_RATES = {".ogg": 192_000}  # musicgen.audio.MAX_RATES
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # handled like Ctrl+C; exit 128 + the signal (143, 129)
DEBUG_ENV = "MUSICGEN_CLI_DEBUG"  # set to 1 to get the traceback of an unexpected error


class CliError(Exception):
    """A one-line error for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


class UsageError(CliError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal), handled like Ctrl+C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.code = 128 + signum


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that exit 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("musicgen-mlx")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------- parsers


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def generate_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="Generate music from text with MusicGen in MLX.",
        epilog=(
            f"Other commands: '{PROG} convert --help' (pre-convert a checkpoint), "
            f"'{PROG} cache --help' (list or clear converted checkpoints). "
            "Full documentation: docs/cli.md."
        ),
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="text description; repeat for several prompts, generated as one batch",
    )
    g.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt a line (blank lines and lines starting with # skipped)",
    )
    g.add_argument(
        "--unconditional",
        action="store_true",
        help="no text: generate (or continue --audio-prompt) without a description",
    )
    g.add_argument(
        "--audio-prompt",
        metavar="FILE",
        help="an audio file to continue (any sample rate and channel count)",
    )
    g.add_argument(
        "--melody",
        metavar="FILE",
        help="MusicGen-Melody models: an audio file whose melody (chroma) to follow, with or "
        "without text (any sample rate and channel count; the first 30 s)",
    )
    g.add_argument(
        "--no-include-prompt",
        dest="include_prompt",
        action="store_false",
        help="with --audio-prompt: output only the new audio, not the prompt before it",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (.wav 16-bit PCM, .flac or .ogg); with several prompts FILE_001.wav, ...",
    )
    g.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write DIR/PREFIX_001.wav, ... continuing after the highest existing number",
    )
    g.add_argument(
        "--prefix",
        metavar="NAME",
        help="file name prefix for --output-dir (default: from the prompt)",
    )
    g.add_argument(
        "--format",
        choices=[e[1:] for e in AUDIO_EXTENSIONS],
        help="audio format when the name is not given by --output (default wav)",
    )
    g.add_argument(
        "--sample-rate",
        type=positive_int,
        metavar="HZ",
        help="resample the output to HZ (soxr, high quality); default the model's rate",
    )
    g.add_argument(
        "--normalize",
        choices=NORMALIZE_STRATEGIES,
        default="none",
        help="level each file as audiocraft does: peak at -1 dBFS, rms at -18 dBFS, or loudness "
        "(see --loudness, then a tanh soft clip); default none: the model's output, clipped to "
        "[-1, 1]",
    )
    g.add_argument(
        "--loudness",
        type=float,
        metavar="LUFS",
        help=f"with --normalize loudness: the target integrated loudness ({DEFAULT_LOUDNESS:g})",
    )
    g.add_argument(
        "--no-metadata", action="store_true", help="do not write the FILE.json metadata sidecar"
    )
    g.add_argument("--play", action="store_true", help="play the result when done")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face repo id or local folder (default {DEFAULT_MODEL})",
    )
    g.add_argument("--revision", help="hub branch, tag or commit of --model")
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="decoder dtype (auto: float16 on a GPU, float32 on the CPU)",
    )
    g.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        metavar="{8,4}",
        help="quantize the decoder's linear layers to 8 or 4 bits",
    )
    g.add_argument(
        "--kv-dtype",
        choices=("auto", "float32", "float16"),
        default="auto",
        help="the self-attention K/V cache's dtype (auto: the decoder's); float16 halves it",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help=f"decoder steps (default {DEFAULT_STEPS}; 50 steps = 1 s, minus 3 for the delays)",
    )
    g.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="length of the new audio in seconds (instead of --max-steps); beyond the model's "
        "30 s window it continues with a sliding window",
    )
    g.add_argument(
        "--extend-stride",
        type=float,
        metavar="SECONDS",
        help=f"with --duration beyond the window: how far each next window moves ({DEFAULT_STRIDE:g})",
    )
    g.add_argument(
        "--top-k", type=int, metavar="K", help="sample from the K most likely tokens (250)"
    )
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, 0 = off (0)")
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature > 0 (1.0)")
    g.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance scale, <= 1 turns it off (3.0)",
    )
    g.add_argument(
        "--seed", type=int, help="random seed (default: a fresh one, saved in the metadata)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no final line")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    return p


def convert_parser() -> Parser:
    p = Parser(
        prog=f"{PROG} convert",
        description="Convert a checkpoint into the conversion cache once, and print where it is.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face repo id or local folder (default {DEFAULT_MODEL})",
    )
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="decoder dtype")
    p.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        metavar="{8,4}",
        help="quantize the decoder's linear layers to 8 or 4 bits",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def cache_parser() -> Parser:
    p = Parser(
        prog=f"{PROG} cache",
        description="Manage the conversion cache ($MUSICGEN_MLX_CACHE, default ~/.cache/musicgen-mlx).",
    )
    sub = p.add_subparsers(dest="action", metavar="{list,clear}", parser_class=Parser)
    sub.required = True
    ls = sub.add_parser("list", help="list converted checkpoints")
    ls.add_argument("--verify", action="store_true", help="also check every file's sha256")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    clear = sub.add_parser("clear", help="remove converted checkpoints")
    clear.add_argument("--model", help="only this model's entries (repo id or folder)")
    return p


# ---------------------------------------------------------------------------------- validation


@dataclass
class Job:
    """Everything a generation needs, checked."""

    prompts: list[str | None]
    folder: Path
    ext: str
    output: Path | None = None  # one explicit file (overwritten)
    prefix: str | None = None  # numbered names PREFIX_001.ext
    names: list[str] = field(default_factory=list)  # default names, from the prompts


def read_prompts(args) -> list[str | None]:
    """The text prompts ([None] for --unconditional)."""
    if args.unconditional:
        if args.prompt or args.prompts_file:
            raise UsageError("--unconditional takes no --prompt or --prompts-file")
        return [None]
    prompts = list(args.prompt)
    for p in prompts:
        if not p.strip():
            raise UsageError("--prompt is empty")
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8-sig")  # a BOM is no prompt
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"cannot read --prompts-file {args.prompts_file}: {reason(e)}"
            ) from None
        lines = [line.strip() for line in text.splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise UsageError(f"no prompts in {args.prompts_file}")
        prompts += found
    if not prompts:
        raise UsageError(
            "give a text description with --prompt TEXT (or --prompts-file FILE, or --unconditional)"
        )
    return [p.strip() for p in prompts]


def reason(e: BaseException) -> str:
    """An OSError's message without the errno noise."""
    return getattr(e, "strerror", None) or str(e)


def check_folder(folder: Path, what: str) -> None:
    """The folder must exist and accept new files (tried for real: os.access lies to root)."""
    if not folder.exists():
        raise UsageError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".musicgen-cli-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({reason(e)})") from None


def slug(prompt: str) -> str:
    """A file name from a prompt: 'Happy rock!' -> 'happy_rock'."""
    s = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48].rstrip("_")
    return s or "musicgen"


# a file's temp name (".NAME.12345678.partial.json" for its sidecar NAME.json) must fit NAME_MAX too
MAX_NAME_BYTES = 255 - len("..12345678.partial.json")


def check_name(name: str, option: str) -> None:
    """UsageError if the file name (with its sidecar's and temp files' additions) is too long."""
    size = len(os.fsencode(name))
    if size > MAX_NAME_BYTES:
        raise UsageError(
            f"{option}: the file name is too long ({size} bytes, at most {MAX_NAME_BYTES})"
        )


def check_output(args, prompts: list[str | None]) -> Job:
    ext = f".{args.format}" if args.format else None
    if args.output is not None and args.output_dir is not None:
        raise UsageError("give --output or --output-dir, not both")
    if args.output is not None:
        if args.prefix:
            raise UsageError("--prefix goes with --output-dir, not --output")
        if not args.output.strip():
            raise UsageError("--output is empty")
        out = Path(args.output).expanduser()
        if out.is_dir():
            raise UsageError(f"--output {out} is a folder (use --output-dir)")
        suffix = out.suffix.lower()
        if not suffix and out.name.lower() in AUDIO_EXTENSIONS:
            raise UsageError(f"--output {out.name} has no name before its extension")
        if suffix not in AUDIO_EXTENSIONS:
            raise UsageError(
                f"unknown output format '{out.suffix or out.name}': use {', '.join(AUDIO_EXTENSIONS)}"
            )
        if ext and ext != suffix:
            raise UsageError(f"--format {args.format} contradicts --output {out.name}")
        folder = out.parent
        check_folder(folder, "output folder")
        if len(prompts) == 1:
            check_name(out.name, "--output")
            if not args.no_metadata and sidecar(out).is_dir():
                raise UsageError(f"{sidecar(out)} is a folder: the metadata cannot go there")
            return Job(prompts, folder, out.suffix, output=out)
        check_name(f"{out.stem}_001{out.suffix}", "--output")
        return Job(prompts, folder, out.suffix, prefix=out.stem)
    if args.output_dir is not None and not args.output_dir.strip():
        raise UsageError("--output-dir is empty")
    folder = Path(args.output_dir).expanduser() if args.output_dir else Path(".")
    check_folder(folder, "--output-dir" if args.output_dir else "current folder")
    if args.prefix is not None:
        if not args.prefix.strip() or "/" in args.prefix or os.sep in args.prefix:
            raise UsageError(f"--prefix must be a plain file name, got '{args.prefix}'")
        check_name(f"{args.prefix}_001{ext or '.wav'}", "--prefix")
        return Job(prompts, folder, ext or ".wav", prefix=args.prefix)
    names = [slug(p) if p else "unconditional" for p in prompts]
    return Job(prompts, folder, ext or ".wav", names=names)


def check_numbers(args) -> None:
    for name in ("duration", "extend_stride", "top_p", "temperature", "guidance", "loudness"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value:g}")
    if args.max_steps is not None and args.duration is not None:
        raise UsageError("give --max-steps or --duration, not both")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.duration is not None and not args.duration > 0:
        raise UsageError(f"--duration must be positive, got {args.duration:g}")
    if args.duration is not None and not args.duration <= MAX_DURATION:
        raise UsageError(f"--duration must be at most {MAX_DURATION:g} s, got {args.duration:g}")
    if args.extend_stride is not None:
        if args.duration is None:
            raise UsageError("--extend-stride goes with --duration")
        if not args.extend_stride > 0:
            raise UsageError(f"--extend-stride must be positive, got {args.extend_stride:g}")
    if args.loudness is not None:
        if args.normalize != "loudness":
            raise UsageError("--loudness goes with --normalize loudness")
        if not -70 <= args.loudness <= 0:
            raise UsageError(f"--loudness must be in [-70, 0] LUFS, got {args.loudness:g}")
    if not args.include_prompt and args.audio_prompt is None:
        raise UsageError("--no-include-prompt goes with --audio-prompt")
    if args.unconditional and args.guidance is not None and args.melody is None:
        raise UsageError(
            "--guidance has no effect with --unconditional (there is no text to guide)"
        )
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        raise UsageError(f"--top-p must be in [0, 1], got {args.top_p:g}")
    if args.temperature is not None and not args.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature:g}")
    if args.guidance is not None and not args.guidance >= 0:
        raise UsageError(f"--guidance must be 0 or more, got {args.guidance:g}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.sample_rate is not None and not 1000 <= args.sample_rate <= 384_000:
        raise UsageError(f"--sample-rate must be in [1000, 384000] Hz, got {args.sample_rate}")


@dataclass(frozen=True)
class Limits:
    """What a checkpoint allows: decoder steps of one pass, rates, and the window of long generation."""

    low: int  # fewest steps of one pass (largest codebook delay + 1)
    high: int  # most steps of one pass, audio prompt included (the decoder's positions)
    frame_rate: int
    sampling_rate: int
    hop: int  # audio samples per frame
    window: int  # frames of the model's window (generation_config max_length): 30 s
    melody: bool | None = None  # a MusicGen-Melody model (None: not known before loading)

    @property
    def delay(self) -> int:
        return self.low - 1


# every published MusicGen checkpoint (small, medium, large, stereo-*)
PUBLISHED_LIMITS = Limits(
    low=4, high=2048, frame_rate=50, sampling_rate=32000, hop=640, window=1500
)
DEFAULT_MAX_LENGTH = 1500  # frames; MusicGen.max_duration's default without generation_config.json


def config_limits(config: dict, max_length: int | None) -> Limits:
    """The Limits of a MusicGen config.json and generation_config.json's max_length."""
    from encodec.encodec import EncodecConfig
    from musicgen.model import MusicgenDecoderConfig

    decoder = MusicgenDecoderConfig.from_dict(config)
    codec = EncodecConfig.from_dict(config["audio_encoder"])
    rate = codec.frame_rate
    window = int((max_length or DEFAULT_MAX_LENGTH) / rate * rate)  # as MusicGen.generate_tokens
    return Limits(
        max(decoder.delays) + 1,
        decoder.max_steps,
        rate,
        codec.sampling_rate,
        codec.hop_length,
        window,
        not decoder.cross_attention,
    )


def model_limits(model, prompts: list[str | None] | None = None) -> Limits:
    """The loaded model's Limits; with `prompts`, less the positions Melody's conditioning takes
    (UsageError when a long text leaves too few)."""
    positions = model.decoder_config.max_position_embeddings
    low = max(model.decoder_config.delays) + 1
    high = model.max_steps
    if prompts is not None and model.is_melody:
        prefix = model.prefix_positions(prompts)
        high = positions - prefix
        chroma = model.decoder_config.chroma_length
        if high < low + model.max_duration * model.frame_rate / 10:  # under a tenth of the window
            raise UsageError(
                f"the text prompt is too long for this Melody model: its {prefix - chroma} tokens and "
                f"the {chroma}-frame melody take {prefix} of the {positions} positions, leaving "
                f"{max(high, 0)} steps"
            )
    return Limits(
        low,
        high,
        model.frame_rate,
        model.sampling_rate,
        model.audio_encoder.hop_length,
        int(model.max_duration * model.frame_rate),
        model.is_melody,
    )


def read_max_length(folder: Path) -> int | None:
    """generation_config.json's max_length in a checkpoint folder, if any."""
    try:
        value = json.loads((folder / "generation_config.json").read_text()).get("max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) else None


def cached_hub_config(model: str, revision: str | None) -> Path | None:
    """config.json of a hub repo id in the local Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # an invalid repo id: the loader reports it
        return None
    return Path(path) if isinstance(path, str) else None


def peek_limits(model: str, revision: str | None) -> Limits:
    """Limits before loading: a local folder's config, a hub repo's cached config, else the published ones."""
    from musicgen.weights import WeightsError, load_config

    config = peek_local_config(model, revision)
    folder = None if config is None else Path(model).expanduser()
    if config is None:
        path = cached_hub_config(model, revision)
        if path is None:
            return PUBLISHED_LIMITS
        try:
            config = load_config(path)
        except WeightsError as e:
            raise CliError(str(e)) from None
        folder = path.parent
    try:
        return config_limits(config, read_max_length(folder))
    except (KeyError, TypeError, ValueError) as e:
        raise CliError(f"{model}: unusable config.json ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Plan:
    """How a run's length is generated."""

    steps: int  # decoder steps in all (every window): the progress bar's total
    max_steps: int | None  # one pass of this many steps, or None: by duration
    frames: int  # new audio frames
    windows: int  # decoder passes (more than 1: sliding window)


def plan_length(args, lim: Limits, prompt_frames: int = 0) -> Plan:
    """Decoder steps for --max-steps / --duration (after an audio prompt), checked against the limits."""
    fr = lim.frame_rate
    prompt_s = f"the {prompt_frames / fr:g} s audio prompt"
    melody_s = " after the Melody conditioning (melody and text)" if lim.melody else ""
    window_s = lim.window / fr
    stride_s = DEFAULT_STRIDE if args.extend_stride is None else args.extend_stride
    stride = int(stride_s * fr)
    if args.extend_stride is not None and not 0 < stride < lim.window:
        raise UsageError(
            f"--extend-stride must be at least {1 / fr:g} s and less than this model's window "
            f"of {window_s:g} s, got {stride_s:g}"
        )
    if args.duration is not None:
        frames = round(args.duration * fr)
        if frames < 1:
            raise UsageError(f"--duration must be at least {1 / fr:g} s (one frame)")
        if prompt_frames + frames <= lim.window:  # one pass
            steps = frames + lim.delay
            if prompt_frames + steps > lim.high:
                what = f"{prompt_s} and --duration" if prompt_frames else "--duration"
                raise UsageError(
                    f"{what} {args.duration:g} s take{'s' * (not prompt_frames)} "
                    f"{prompt_frames + steps} steps, more than this model's {lim.high}{melody_s}"
                )
            return Plan(steps, None, frames, 1)
        from musicgen.generate import sliding_windows

        if not 0 < stride < lim.window:  # the default stride, on a model with a short window
            raise UsageError(
                f"this model's window of {window_s:g} s is too short for the default "
                f"--extend-stride of {stride_s:g} s: give a smaller one"
            )
        if prompt_frames >= lim.window:
            raise UsageError(
                f"{prompt_s} must be shorter than this model's window of {window_s:g} s "
                "to continue beyond the window"
            )
        if lim.window + lim.delay > lim.high:
            raise UsageError(
                f"this model's window of {lim.window} frames exceeds its {lim.high} steps"
                f"{melody_s}: give a --duration of at most {(lim.high - lim.delay) / fr:g} s"
            )
        windows = sliding_windows(prompt_frames + frames, prompt_frames, lim.window, stride)
        steps = sum(length - context + lim.delay for _, context, length in windows)
        return Plan(steps, None, frames, len(windows))
    steps = DEFAULT_STEPS if args.max_steps is None else args.max_steps
    if prompt_frames + lim.low > lim.high:
        raise UsageError(
            f"{prompt_s} is too long for this model: one pass holds "
            f"{(lim.high - lim.low) / fr:g} s of prompt at most"
        )
    if steps < lim.low:
        raise UsageError(f"--max-steps must be at least {lim.low} for this model, got {steps}")
    if steps > lim.high - prompt_frames:
        after = f" after {prompt_s}" if prompt_frames else ""
        raise UsageError(
            f"--max-steps must be at most {lim.high - prompt_frames} for this model{after}, "
            f"got {steps} (--duration SECONDS goes beyond one pass)"
        )
    return Plan(steps, steps, steps - lim.delay, 1)


def check_audio_file(path: str, option: str = "--audio-prompt") -> dict:
    """A readable, non-empty audio file (cheap: header only): its rate, channels and length."""
    import soundfile as sf

    if not Path(path).is_file():
        if Path(path).is_dir():
            what = "is a folder"
        elif Path(path).exists():
            what = "is not a regular file"  # /dev/null, a pipe
        else:
            what = "does not exist"
        raise UsageError(f"{option} {path} {what}")
    try:
        info = sf.info(path)
    except (OSError, RuntimeError, sf.LibsndfileError) as e:
        raise UsageError(f"cannot read {option} {path}: {reason(e)}") from None
    if info.frames <= 0:
        raise UsageError(f"{option} {path} is empty")
    return {
        "file": path,
        "sample_rate": info.samplerate,
        "channels": info.channels,
        "duration_s": round(info.frames / info.samplerate, 6),
    }


def check_melody_model(lim: Limits) -> None:
    """--melody goes with a MusicGen-Melody model (unknown before loading a repo not in the cache)."""
    if lim.melody is False:
        raise UsageError(
            "--melody needs a MusicGen-Melody model (such as facebook/musicgen-melody); "
            "this one has no melody conditioning"
        )


def load_melody(path: str, lim: Limits):
    """The --melody file at the model's rate."""
    from musicgen.audio import load_audio

    check_melody_model(lim)
    try:
        audio = load_audio(path, lim.sampling_rate)[0]
    except (OSError, RuntimeError) as e:
        raise UsageError(f"cannot read --melody {path}: {reason(e)}") from None
    return check_finite(audio, f"--melody {path}")


def check_finite(audio, what: str):
    """UsageError for audio holding NaN or infinite samples (a float file can): they spread to
    every token."""
    import mlx.core as mx

    if not mx.all(mx.isfinite(audio)).item():
        raise UsageError(f"{what} holds NaN or infinite samples")
    return audio


def load_prompt_audio(path: str, lim: Limits):
    """The audio prompt at the model's rate, and its length in frames."""
    from musicgen.audio import load_audio

    try:
        audio, _ = load_audio(path, lim.sampling_rate)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"cannot read --audio-prompt {path}: {reason(e)}") from None
    check_finite(audio, f"--audio-prompt {path}")
    return audio, -(-int(audio.shape[0]) // lim.hop)


LINUX_PLAYERS = (
    ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "error"], AUDIO_EXTENSIONS),
    ("aplay", ["-q"], (".wav",)),
    ("paplay", [], AUDIO_EXTENSIONS),
    ("play", ["-q"], AUDIO_EXTENSIONS),
)


def find_player(ext: str) -> list[str] | None:
    """The command that plays a file of this format here, or None."""
    if sys.platform == "darwin":
        return ["afplay"] if shutil.which("afplay") else None
    for name, flags, formats in LINUX_PLAYERS:
        path = shutil.which(name)
        if path and ext.lower() in formats:
            return [path, *flags]
    return None


NO_PLAYER = (
    "--play: no audio player found (macOS: afplay; Linux: install ffmpeg (ffplay), alsa-utils (aplay), "
    "pulseaudio-utils (paplay) or sox (play))"
)


# ------------------------------------------------------------------------------- output files


UMASK = os.umask(0o022)
os.umask(UMASK)


class Outputs:
    """Temp files and finished files of this run: all removed if the run is interrupted."""

    def __init__(self):
        self.temps: set[Path] = set()
        self.done: list[Path] = []
        self.reserved: set[str] = set()
        self.keep = False

    def cleanup(self) -> None:
        for path in list(self.temps) + ([] if self.keep else self.done):
            with contextlib.suppress(OSError):
                path.unlink()
        self.temps.clear()

    def temp_for(self, dest: Path) -> Path:
        tmp = dest.parent / f".{dest.stem}.{uuid.uuid4().hex[:8]}.partial{dest.suffix}"
        self.temps.add(tmp)
        return tmp

    def place(self, tmp: Path, dest: Path, overwrite: bool) -> None:
        """Rename a finished temp file into place; without `overwrite`, FileExistsError if dest exists."""
        # temp files are private (0600); the result gets the usual mode
        os.chmod(tmp, 0o666 & ~UMASK)
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)  # atomic and never overwrites
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system
                if dest.exists():
                    raise FileExistsError(dest) from None
                os.replace(tmp, dest)
            else:
                tmp.unlink()
        self.temps.discard(tmp)
        self.done.append(dest)


NUMBERED = re.compile(r"_(\d+)(?:\.|$)")


def highest_number(folder: Path, prefix: str) -> int:
    """The highest N of the files PREFIX_N.* in folder (0 if none)."""
    top = 0
    for path in folder.iterdir():
        if path.name.startswith(f"{prefix}_"):
            m = NUMBERED.match(path.name[len(prefix) :])
            if m:
                top = max(top, int(m.group(1)))
    return top


def free_name(folder: Path, prefix: str, ext: str, taken: set[str], numbered: bool) -> Path:
    """PREFIX.ext if it and its sidecar are free and not `numbered`, else the next PREFIX_NNN.ext."""
    plain = folder / f"{prefix}{ext}"
    if (
        not numbered
        and plain.name not in taken
        and not plain.exists()
        and not sidecar(plain).exists()
    ):
        return plain
    n = highest_number(folder, prefix)
    while True:
        n += 1
        path = folder / f"{prefix}_{n:03d}{ext}"
        if path.name not in taken and not path.exists() and not sidecar(path).exists():
            return path


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_file(outputs: Outputs, job: Job, i: int, audio, rate: int, metadata: dict | None) -> Path:
    """Write clip i (and its sidecar) through temp files, both written before either replaces
    anything (a full disk or a folder in the sidecar's place must not cost the old file); returns
    the final path."""
    from musicgen.audio import save_audio

    while True:
        if job.output is not None:
            dest, overwrite = job.output, True
        else:
            prefix = job.prefix or job.names[i]
            dest = free_name(
                job.folder, prefix, job.ext, outputs.reserved, numbered=bool(job.prefix)
            )
            overwrite = False
        meta = sidecar(dest)
        if meta.is_dir():
            raise CliError(f"cannot write {meta}: it is a folder")
        tmp = outputs.temp_for(dest)
        try:
            save_audio(tmp, audio, rate)
        except OSError as e:
            raise CliError(f"cannot write {dest}: {reason(e)}") from None
        except Exception as e:  # e.g. libsndfile refusing a rate for a format
            raise CliError(f"cannot write {dest}: {e}") from None
        meta_tmp = None if metadata is None else outputs.temp_for(meta)
        if meta_tmp is not None:
            try:
                meta_tmp.write_text(json.dumps({**metadata, "file": dest.name}, indent=2) + "\n")
            except OSError as e:
                raise CliError(f"cannot write {meta}: {reason(e)}") from None
        try:
            outputs.place(tmp, dest, overwrite)
        except FileExistsError:  # another process took the name meanwhile: next number
            outputs.reserved.add(dest.name)
            for t in (tmp, meta_tmp):
                if t is not None:
                    t.unlink(missing_ok=True)
                    outputs.temps.discard(t)
            continue
        except OSError as e:
            raise CliError(f"cannot write {dest}: {reason(e)}") from None
        outputs.reserved.add(dest.name)
        break
    try:
        if meta_tmp is not None:
            outputs.place(meta_tmp, meta, overwrite=True)
        elif overwrite:  # the sidecar of the file just replaced would describe other audio
            meta.unlink(missing_ok=True)
    except OSError as e:
        raise CliError(f"cannot write {meta}: {reason(e)}") from None
    return dest


# ---------------------------------------------------------------------------------- commands


def log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def dtype_arg(name: str):
    import mlx.core as mx

    return None if name == "auto" else getattr(mx, name)


def dtype_name(name: str) -> str:
    """ "float32" etc.; auto is what MusicGen picks on this machine."""
    if name != "auto":
        return name
    from musicgen.musicgen import default_dtype

    return str(default_dtype()).rsplit(".", 1)[-1]


def load_model(args):
    """MusicGen.from_pretrained with its errors as one-line CliErrors."""
    from musicgen.musicgen import MusicGen
    from musicgen.weights import WeightsError

    try:
        return MusicGen.from_pretrained(
            args.model,
            dtype=dtype_arg(args.dtype),
            revision=args.revision,
            quantize=args.quantize,
            kv_dtype=dtype_arg(getattr(args, "kv_dtype", "auto")),
            progress=not args.quiet,
        )
    except WeightsError as e:
        raise CliError(str(e)) from None
    except OSError as e:  # download failures, unreadable files, full disk while converting
        raise CliError(f"cannot load {args.model}: {reason(e)}") from None
    # weights that do not fit the config (missing or extra tensors, wrong shapes)
    except (KeyError, TypeError, ValueError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        raise CliError(
            f"cannot load {args.model}: {type(e).__name__}: {one_line(e)} "
            "(is it a complete MusicGen checkpoint?)"
        ) from None
    except RuntimeError as e:  # MLX's I/O errors (e.g. a full disk while converting)
        if os.environ.get(DEBUG_ENV):
            raise
        raise CliError(f"cannot load {args.model}: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    """An exception's message on one line (MLX lists missing parameters one a line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def looks_like_path(model: str) -> bool:
    """A local path rather than a hub repo id (as musicgen.weights decides)."""
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def peek_local_config(model: str, revision: str | None = None) -> dict | None:
    """The config of a local checkpoint folder (cheap; refuses unsupported model types), else None."""
    from musicgen.weights import WeightsError, check_companions, load_config, weight_files

    if not model.strip():
        raise UsageError("--model is empty")
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--model {model} is a file: give the checkpoint's folder")
    if not path.is_dir():
        if looks_like_path(model):
            raise CliError(f"no such model folder: {model}")
        return None
    if revision is not None:
        raise UsageError(f"--revision is for a hub repo id; {model} is a local folder")
    try:
        config = load_config(path)
        weight_files(path)
        check_companions(path)
    except WeightsError as e:
        raise CliError(str(e)) from None
    return config


def model_source(model) -> dict:
    """Where the weights came from (repo and commit, or folder), from the conversion cache manifest."""
    try:
        manifest = json.loads((Path(model.config["_converted_path"]) / "manifest.json").read_text())
    except (OSError, ValueError, KeyError):
        return {}
    source = manifest.get("source", {})
    return {k: source[k] for k in ("repo", "commit", "folder") if k in source}


def cmd_generate(argv: list[str], outputs: Outputs) -> int:
    args = generate_parser().parse_args(argv)
    prompts = read_prompts(args)
    check_numbers(args)
    prompt_info = None if args.audio_prompt is None else check_audio_file(args.audio_prompt)
    melody_info = None if args.melody is None else check_audio_file(args.melody, "--melody")
    job = check_output(args, prompts)
    limit = MAX_RATES.get(job.ext.lower())
    if args.sample_rate and limit and args.sample_rate > limit:
        raise UsageError(f"--sample-rate must be at most {limit} Hz for {job.ext} files")
    player = find_player(job.ext) if args.play else None
    if args.play and player is None:
        print(f"{PROG}: warning: {NO_PLAYER}; the file will only be saved", file=sys.stderr)

    t0 = time.perf_counter()
    import musicgen  # noqa: F401  (OpenBLAS before mlx)

    # refuse bad lengths before loading (a hub repo not in the cache: the published limits)
    lim = peek_limits(args.model, args.revision)
    audio_prompt, prompt_frames = None, 0
    if prompt_info is not None:  # a prompt too long is refused from its header, before decoding
        samples = round(prompt_info["duration_s"] * prompt_info["sample_rate"])
        resampled = round(samples * lim.sampling_rate / prompt_info["sample_rate"])  # as soxr
        plan_length(args, lim, -(-resampled // lim.hop))
        audio_prompt, prompt_frames = load_prompt_audio(args.audio_prompt, lim)
    plan_length(args, lim, prompt_frames)
    if args.melody is not None:
        check_melody_model(lim)
    model = load_model(args)
    if model.sampling_rate != lim.sampling_rate and args.audio_prompt is not None:
        audio_prompt, prompt_frames = load_prompt_audio(args.audio_prompt, model_limits(model))
    plan = plan_length(args, model_limits(model, prompts), prompt_frames)
    melody = None if args.melody is None else load_melody(args.melody, model_limits(model))
    load_s = time.perf_counter() - t0

    import mlx.core as mx
    from tqdm import tqdm

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gc = model.generation_config
    stride = DEFAULT_STRIDE if args.extend_stride is None else args.extend_stride
    params = {
        "max_steps": plan.steps,
        "duration": args.duration,
        "extend_stride": stride if plan.windows > 1 else None,
        "windows": plan.windows,
        "top_k": gc["top_k"] if args.top_k is None else args.top_k,
        "top_p": gc["top_p"] if args.top_p is None else args.top_p,
        "temperature": gc["temperature"] if args.temperature is None else args.temperature,
        # unconditional: no text to guide (nor a melody), so MusicGen turns guidance off
        "guidance": None
        if args.unconditional and melody is None
        else gc["guidance_coef"]
        if args.guidance is None
        else args.guidance,
        "seed": seed,
        "unconditional": args.unconditional,
        "melody": melody_info,
        "audio_prompt": None
        if prompt_info is None
        else {**prompt_info, "frames": prompt_frames, "included": args.include_prompt},
    }
    t1 = time.perf_counter()
    with tqdm(
        total=plan.steps,
        desc="Generating",
        unit="step",
        disable=args.quiet,
        leave=False,
        dynamic_ncols=True,
    ) as bar:

        def advance(done: int, total: int) -> None:
            bar.update(done - bar.n)  # `done` counts every window's steps so far

        tokens = model.generate_tokens(
            prompts[0] if args.unconditional else prompts,
            plan.max_steps,
            duration=args.duration if plan.max_steps is None else None,
            audio_prompt=audio_prompt,
            melody=melody,
            include_prompt=args.include_prompt,
            extend_stride=stride,
            top_k=params["top_k"],
            top_p=params["top_p"],
            temperature=params["temperature"],
            guidance_coef=params["guidance"],
            seed=seed,
            progress=False,
            callback=advance,
        )
        mx.eval(tokens)
    t2 = time.perf_counter()
    audio = model.decode_tokens(tokens)
    mx.eval(audio)
    t3 = time.perf_counter()

    rate = model.sampling_rate
    if args.sample_rate and args.sample_rate != rate:
        from musicgen.audio import resample

        clips = [resample(audio[i], rate, args.sample_rate) for i in range(len(prompts))]
        rate = args.sample_rate
    else:
        clips = [audio[i] for i in range(len(prompts))]
    loudness = DEFAULT_LOUDNESS if args.loudness is None else args.loudness
    if args.normalize != "none":
        from musicgen.audio import normalize

        clips = [normalize(c, rate, args.normalize, loudness_db=loudness) for c in clips]
    frames = int(tokens.shape[-1])
    seconds = frames / model.frame_rate
    samples = int(clips[0].shape[0])
    gen_s = t3 - t1
    rtf = seconds * len(prompts) / gen_s if gen_s > 0 else float("inf")
    common = {
        "model": args.model,
        "revision": args.revision,
        "source": model_source(model),
        "dtype": dtype_name(args.dtype),
        "quantize": args.quantize,
        "kv_dtype": str(model.decoder.cache_dtype).rsplit(".", 1)[-1],
        "huge_pages": huge_pages.asked(),
        **params,
        "batch_size": len(prompts),
        "frames": frames,
        "duration_s": samples / rate,
        "sample_rate": rate,
        "model_sample_rate": model.sampling_rate,
        "normalize": args.normalize,
        **({"loudness_lufs": loudness} if args.normalize == "loudness" else {}),
        "channels": int(clips[0].shape[-1]),
        "samples": samples,
        "timings_s": {
            "load": round(load_s, 3),
            "generate": round(t2 - t1, 3),
            "decode": round(t3 - t2, 3),
            "real_time_factor": round(rtf, 3),
        },
        "package": "musicgen-mlx",
        "version": version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [PROG, *argv],
    }
    paths = []
    for i, (prompt, clip) in enumerate(zip(prompts, clips, strict=True)):
        metadata = None if args.no_metadata else {"prompt": prompt, "batch_index": i, **common}
        paths.append(write_file(outputs, job, i, clip, rate, metadata))
    outputs.keep = True  # complete: an interrupt from now on (e.g. while playing) keeps the files

    if not args.quiet:
        what = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        print(
            f"Saved {what}: {samples / rate:.2f} s at {rate} Hz in {gen_s:.2f} s "
            f"({rtf:.2f}x real time)"
        )
    if player:
        for path in paths:
            subprocess.run([*player, str(path)], check=False)
    return 0


def cmd_convert(argv: list[str]) -> int:
    args = convert_parser().parse_args(argv)
    import musicgen  # noqa: F401  (OpenBLAS before mlx)
    from musicgen.weights import cache_entries

    peek_local_config(args.model, args.revision)
    before = {e["path"] for e in cache_entries() if e.get("ok")}
    model = load_model(args)
    entry = Path(model.config["_converted_path"])
    what = dtype_name(args.dtype) + (f", {args.quantize}-bit" if args.quantize else "")
    size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
    state = "already converted" if str(entry) in before else "converted"
    log(args, f"{args.model} ({what}) {state}: {human_size(size)}")
    print(entry)
    return 0


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_cache(argv: list[str]) -> int:
    args = cache_parser().parse_args(argv)
    from musicgen.weights import cache_entries, cache_leftovers, cache_root, clear_cache

    root = cache_root()
    if args.action == "clear":
        n = clear_cache(model=args.model)
        which = f" of {args.model}" if args.model else ""
        print(f"Removed {n} entr{'y' if n == 1 else 'ies'}{which} from {root}")
        return 0
    entries = cache_entries(verify=args.verify)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    total = sum(e["size"] for e in entries)
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_size(total)}")
    for e in entries:
        if e.get("ok"):
            created = datetime.fromtimestamp(e.get("created", 0)).strftime("%Y-%m-%d %H:%M")
            what = e.get("dtype", "?") + (f" q{e['quantize']}" if e.get("quantize") else "")
            rev = f"@{e['revision']}" if e.get("revision") else ""
            print(
                f"  {e.get('model', '?')}{rev}  {what}  {human_size(e['size'])}  {created}  "
                f"{Path(e['path']).name}"
            )
        else:
            print(f"  {Path(e['path']).name}  BROKEN ({e['error']}); rebuilt on next use")
    leftovers = cache_leftovers()
    if leftovers:
        size = human_size(sum(left["size"] for left in leftovers))
        print(
            f"  and {len(leftovers)} folder{'s' * (len(leftovers) > 1)} ({size}) left by interrupted "
            f"conversions: '{PROG} cache clear' removes them"
        )
    return 0


# -------------------------------------------------------------------------------------- main


def _terminate(signum, frame):
    raise Terminated(signum)


def _clean_up(outputs: Outputs) -> None:
    """Remove partial outputs with Ctrl+C and the stop signals ignored: a second one must not
    break it."""
    names = ("SIGINT", *STOP_SIGNALS)
    ignored = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
    try:
        outputs.cleanup()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the status."""
    # the console script: run again with huge pages where they help (apps/huge_pages.py)
    if argv is None:
        huge_pages.run_again_with_huge_pages()
    argv = sys.argv[1:] if argv is None else list(argv)
    # library warnings (a BLAS that does not load, ...) as one line each, like the CLI's own
    warnings.formatwarning = lambda message, *_args, **_kw: f"{PROG}: warning: {message}\n"
    outputs = Outputs()
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    try:
        if argv[:1] == ["convert"]:
            code = cmd_convert(argv[1:])
        elif argv[:1] == ["cache"]:
            code = cmd_cache(argv[1:])
        else:
            code = cmd_generate(argv, outputs)
    except (KeyboardInterrupt, Terminated) as e:
        _clean_up(outputs)
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        code = e.code if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except CliError as e:
        _clean_up(outputs)
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        code = e.code
    except Exception as e:
        _clean_up(outputs)
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"{PROG}: error: {type(e).__name__}: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        code = EXIT_ERROR
    sys.exit(code)


if __name__ == "__main__":
    main()
