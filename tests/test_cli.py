"""musicgen-cli end to end, run as a user would (a subprocess in a temp folder) on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from apps import huge_pages

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "tiny-musicgen"
STEREO = REPO / "tests" / "fixtures" / "tiny-musicgen-stereo"
MELODY = REPO / "tests" / "fixtures" / "tiny-musicgen-melody"
HOP = 640  # audio samples per frame (32 kHz, 50 frames a second)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One conversion cache for the module: the tiny checkpoint is converted once, not per test."""
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture
def cli(tmp_path, shared_cache):
    """run(*args, cwd=None, env=None) -> CompletedProcess of `python -m apps.musicgen_cli args` in tmp_path."""
    work = tmp_path / "work"
    work.mkdir()

    def env_for(extra: dict | None) -> dict:
        env = dict(os.environ)
        env.update(
            MUSICGEN_MLX_CACHE=str(shared_cache),
            HF_HUB_OFFLINE="1",  # tests never reach the network
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        )
        env.update(extra or {})
        return env

    def run(
        *args,
        cwd: Path | None = None,
        env: dict | None = None,
        timeout: float = 120,
        wrap: list[str] = (),
    ):
        return subprocess.run(
            [*wrap, sys.executable, "-m", "apps.musicgen_cli", *map(str, args)],
            cwd=cwd or work,
            env=env_for(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    run.work = work
    run.env_for = env_for
    return run


def write_prompt_wav(path: Path, seconds: float = 0.5, rate: int = 16_000, channels: int = 2):
    """A noise clip as an audio prompt (16 kHz stereo by default: the CLI resamples and mixes)."""
    import numpy as np

    noise = np.random.default_rng(0).uniform(-0.3, 0.3, (round(seconds * rate), channels))
    sf.write(path, noise.astype(np.float32), rate)
    return path


def files(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones included (temp files start with a dot)."""
    return sorted(p.name for p in folder.iterdir())


def assert_ok(result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ generation


def test_wav_format_length_and_metadata(cli):
    r = cli(
        "--prompt",
        "happy rock",
        "--model",
        TINY,
        "--max-steps",
        40,
        "--seed",
        7,
        "--output",
        "happy_rock.wav",
    )
    assert_ok(r)
    assert files(cli.work) == ["happy_rock.wav", "happy_rock.wav.json"]
    info = sf.info(cli.work / "happy_rock.wav")
    assert (info.format, info.subtype, info.samplerate, info.channels) == (
        "WAV",
        "PCM_16",
        32000,
        1,
    )
    assert info.frames == 23_680  # 40 steps -> 37 frames -> 37 * 640 samples
    # the final line: file, duration and real-time factor
    assert re.fullmatch(
        r"Saved happy_rock\.wav: 0\.74 s at 32000 Hz in [\d.]+ s \([\d.]+x real time\)\n", r.stdout
    )
    meta = json.loads((cli.work / "happy_rock.wav.json").read_text())
    assert meta["prompt"] == "happy rock" and meta["file"] == "happy_rock.wav"
    assert meta["model"] == str(TINY) and meta["source"] == {"folder": str(TINY)}
    assert (meta["max_steps"], meta["frames"], meta["samples"], meta["duration_s"]) == (
        40,
        37,
        23_680,
        0.74,
    )
    assert (meta["top_k"], meta["top_p"], meta["temperature"], meta["guidance"]) == (
        250,
        0.0,
        1.0,
        3.0,
    )
    assert meta["seed"] == 7 and meta["dtype"] == "float32" and meta["quantize"] is None
    assert meta["kv_dtype"] == "float32"
    # the CLI ran itself again with glibc's huge page tunable where the kernel gives them on request
    assert meta["huge_pages"] is (huge_pages.asked() or huge_pages.wanted())
    assert meta["sample_rate"] == 32000 and meta["channels"] == 1
    assert set(meta["timings_s"]) == {"load", "generate", "decode", "real_time_factor"}
    assert meta["package"] == "musicgen-mlx" and meta["version"]


def test_kv_dtype_float16(cli):
    """--kv-dtype float16: recorded in the sidecar; the fixture's greedy-margin audio is the same
    length, and a dtype the cache does not take is a one-line usage error."""
    args = ["--prompt", "lo-fi beat", "--model", TINY, "--max-steps", 30, "--seed", 3, "-q"]
    assert_ok(cli(*args, "--kv-dtype", "float16", "--output", "half.wav"))
    meta = json.loads((cli.work / "half.wav.json").read_text())
    assert meta["kv_dtype"] == "float16" and meta["dtype"] == "float32" and meta["frames"] == 27
    r = cli(*args, "--kv-dtype", "bfloat16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--kv-dtype" in r.stderr


def test_seed_reproducible(cli):
    args = ["--prompt", "lo-fi beat", "--model", TINY, "--max-steps", 30, "-q"]
    for name, seed in (("a.wav", 3), ("b.wav", 3), ("c.wav", 4)):
        assert_ok(cli(*args, "--seed", seed, "--output", name, "--no-metadata"))
    a, b, c = ((cli.work / n).read_bytes() for n in ("a.wav", "b.wav", "c.wav"))
    assert a == b
    assert a != c
    assert files(cli.work) == ["a.wav", "b.wav", "c.wav"]  # --no-metadata: no sidecars
    # overwriting a file without metadata removes the sidecar that described its old audio
    assert_ok(cli(*args, "--seed", 4, "--output", "a.wav"))
    assert json.loads((cli.work / "a.wav.json").read_text())["seed"] == 4
    assert_ok(cli(*args, "--seed", 3, "--output", "a.wav", "--no-metadata"))
    assert files(cli.work) == ["a.wav", "b.wav", "c.wav"] and (cli.work / "a.wav").read_bytes() == a


def test_random_seed_is_recorded_and_replays(cli):
    args = ["--prompt", "jazz", "--model", TINY, "--max-steps", 20, "-q"]
    assert_ok(cli(*args, "--output", "first.wav"))
    seed = json.loads((cli.work / "first.wav.json").read_text())["seed"]
    assert_ok(cli(*args, "--output", "again.wav", "--seed", seed))
    assert (cli.work / "first.wav").read_bytes() == (cli.work / "again.wav").read_bytes()


def test_numbering_never_overwrites(cli):
    out = cli.work / "out"
    out.mkdir()
    (out / "take_007.wav").write_bytes(b"keep me")
    (out / "take_x.wav").write_bytes(b"not numbered")
    common = ["--model", TINY, "--max-steps", 10, "-q", "--output-dir", out, "--prefix", "take"]
    assert_ok(cli("--prompt", "one", "--prompt", "two", *common))  # one batch of two
    assert_ok(cli("--prompt", "three", *common))
    assert files(out) == [
        "take_007.wav", "take_008.wav", "take_008.wav.json", "take_009.wav", "take_009.wav.json",
        "take_010.wav", "take_010.wav.json", "take_x.wav",
    ]  # fmt: skip
    assert (out / "take_007.wav").read_bytes() == b"keep me"
    prompts = [
        json.loads((out / f"take_{n:03d}.wav.json").read_text())["prompt"] for n in (8, 9, 10)
    ]
    assert prompts == ["one", "two", "three"]

    # several prompts with --output x.wav -> x_001.wav, x_002.wav
    assert_ok(
        cli(
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--model",
            TINY,
            "--max-steps",
            10,
            "-q",
            "--output",
            "x.wav",
            "--no-metadata",
        )
    )
    # no output given: named from the prompt, in the current folder, never overwriting
    for _ in range(2):
        assert_ok(
            cli(
                "--prompt", "Happy Rock!", "--model", TINY, "--max-steps", 10, "-q", "--no-metadata"
            )
        )
    assert files(cli.work) == [
        "happy_rock.wav",
        "happy_rock_001.wav",
        "out",
        "x_001.wav",
        "x_002.wav",
    ]


def test_normalize_peak_and_loudness(cli):
    """--normalize levels each file after resampling; the sidecar says how."""
    import numpy as np
    import pyloudnorm

    common = ("--prompt", "happy rock", "--model", TINY, "--max-steps", 60, "--seed", 3)
    assert_ok(cli(*common, "--normalize", "peak", "--sample-rate", 16000, "-o", "peak.wav"))
    peak, rate = sf.read(cli.work / "peak.wav")
    assert rate == 16000 and abs(np.abs(peak).max() - 10 ** (-1 / 20)) < 1 / 32768
    assert json.loads((cli.work / "peak.wav.json").read_text())["normalize"] == "peak"

    assert_ok(cli(*common, "--normalize", "loudness", "--loudness", -20, "-o", "loud.wav"))
    loud, rate = sf.read(cli.work / "loud.wav")
    # -20 LUFS: the tanh soft clip barely touches such a level; 16-bit rounding neither
    assert abs(pyloudnorm.Meter(rate).integrated_loudness(loud) + 20) < 0.05
    meta = json.loads((cli.work / "loud.wav.json").read_text())
    assert (meta["normalize"], meta["loudness_lufs"]) == ("loudness", -20.0)

    assert_ok(cli(*common, "-o", "raw.wav"))
    raw, _ = sf.read(cli.work / "raw.wav")
    assert json.loads((cli.work / "raw.wav.json").read_text())["normalize"] == "none"
    # the same seed: the same music at another level
    assert abs(np.corrcoef(raw, loud)[0, 1]) > 0.99


def test_prompts_file_flac_resampled_duration(cli):
    (cli.work / "prompts.txt").write_text("# my prompts\n\nambient pads\n  \n# skip\nfast drums\n")
    out = cli.work / "out"
    out.mkdir()
    r = cli(
        "--prompts-file",
        "prompts.txt",
        "--model",
        TINY,
        "--duration",
        0.5,
        "--format",
        "flac",
        "--sample-rate",
        16000,
        "--output-dir",
        out,
        "--seed",
        1,
    )
    assert_ok(r)
    assert files(out) == [
        "ambient_pads.flac", "ambient_pads.flac.json", "fast_drums.flac", "fast_drums.flac.json",
    ]  # fmt: skip
    for name in ("ambient_pads.flac", "fast_drums.flac"):
        info = sf.info(out / name)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        assert (
            info.frames == 8000
        )  # 0.5 s: 25 frames -> 16,000 samples at 32 kHz -> 8,000 at 16 kHz
    meta = json.loads((out / "fast_drums.flac.json").read_text())
    assert (meta["prompt"], meta["batch_index"], meta["batch_size"]) == ("fast drums", 1, 2)
    assert (meta["max_steps"], meta["frames"], meta["sample_rate"]) == (28, 25, 16000)
    assert r.stdout.startswith("Saved 2 files")


def test_duration_beyond_window_slides(cli):
    """62 s on a model with a 30 s window: audiocraft's sliding window, 3 windows, exact length."""
    r = cli("--prompt", "long ambient", "--model", TINY, "--duration", 62, "--seed", 2,
            "--output", "long.wav", timeout=300)  # fmt: skip
    assert_ok(r)
    info = sf.info(cli.work / "long.wav")
    assert (info.samplerate, info.channels, info.frames) == (32000, 1, 62 * 50 * HOP)
    assert r.stdout.startswith("Saved long.wav: 62.00 s at 32000 Hz")
    meta = json.loads((cli.work / "long.wav.json").read_text())
    # windows of 1500 frames every 900 (stride 18 s): 0-1500, 900-2400 (600 continued),
    # 1800-3100 (600 continued); steps = new frames + 3 delay steps per window
    assert (meta["duration"], meta["frames"], meta["windows"], meta["extend_stride"]) == (
        62.0,
        3100,
        3,
        18.0,
    )
    assert meta["max_steps"] == 1503 + 903 + 703
    # a bigger stride: fewer windows, same length
    r = cli("--prompt", "long ambient", "--model", TINY, "--duration", 62, "--extend-stride", 25,
            "-q", "--output", "stride.wav", timeout=300)  # fmt: skip
    assert_ok(r)
    assert sf.info(cli.work / "stride.wav").frames == 62 * 50 * HOP
    meta = json.loads((cli.work / "stride.wav.json").read_text())
    assert (meta["windows"], meta["extend_stride"]) == (3, 25.0)  # 0-1500, 1250-2750, 2500-3100


def test_audio_prompt_continuation(cli):
    """A 16 kHz stereo prompt, resampled to 32 kHz and mixed down for the mono model, is continued."""
    write_prompt_wav(cli.work / "riff.wav")  # 0.5 s -> 16,000 samples at 32 kHz -> 25 frames
    common = ["--prompt", "guitar", "--model", TINY, "--audio-prompt", "riff.wav", "--seed", 4]
    assert_ok(cli(*common, "--max-steps", 20, "--output", "with.wav"))
    info = sf.info(cli.work / "with.wav")
    assert (info.samplerate, info.channels, info.frames) == (32000, 1, (25 + 17) * HOP)
    meta = json.loads((cli.work / "with.wav.json").read_text())
    assert meta["audio_prompt"] == {
        "file": "riff.wav", "sample_rate": 16000, "channels": 2, "duration_s": 0.5,
        "frames": 25, "included": True,
    }  # fmt: skip
    assert (meta["max_steps"], meta["frames"]) == (20, 42)

    assert_ok(cli(*common, "--max-steps", 20, "--no-include-prompt", "-o", "new.wav"))
    assert sf.info(cli.work / "new.wav").frames == 17 * HOP
    assert json.loads((cli.work / "new.wav.json").read_text())["audio_prompt"]["included"] is False

    # --duration counts the new audio only
    assert_ok(cli(*common, "--duration", 1, "-q", "-o", "dur.wav"))
    assert sf.info(cli.work / "dur.wav").frames == (25 + 50) * HOP


def test_unconditional(cli):
    write_prompt_wav(cli.work / "riff.wav", channels=1)
    common = ["--unconditional", "--model", TINY, "--max-steps", 20, "--seed", 9]
    r = cli(*common)
    assert_ok(r)
    assert r.stdout.startswith("Saved unconditional.wav: 0.34 s")
    assert sf.info(cli.work / "unconditional.wav").frames == 17 * HOP
    meta = json.loads((cli.work / "unconditional.wav.json").read_text())
    assert meta["prompt"] is None and meta["unconditional"] is True and meta["guidance"] is None
    # again with the same seed: byte-identical; and an unconditional continuation
    assert_ok(cli(*common, "-q", "-o", "again.wav"))
    assert (cli.work / "again.wav").read_bytes() == (cli.work / "unconditional.wav").read_bytes()
    assert_ok(cli(*common, "-q", "--audio-prompt", "riff.wav", "-o", "cont.wav"))
    assert sf.info(cli.work / "cont.wav").frames == (25 + 17) * HOP


def test_stereo_model(cli):
    r = cli("--prompt", "wide pads", "--model", STEREO, "--max-steps", 40, "--seed", 1,
            "--output", "stereo.wav")  # fmt: skip
    assert_ok(r)
    info = sf.info(cli.work / "stereo.wav")
    assert (info.format, info.subtype, info.samplerate, info.channels, info.frames) == (
        "WAV",
        "PCM_16",
        32000,
        2,
        37 * HOP,
    )
    left, right = sf.read(cli.work / "stereo.wav")[0].T
    assert (left != right).any()  # two channels decoded from their own codebooks
    meta = json.loads((cli.work / "stereo.wav.json").read_text())
    assert (meta["channels"], meta["frames"], meta["samples"]) == (2, 37, 37 * HOP)


def test_melody_model(cli):
    """--melody on a MusicGen-Melody model: with text, alone (guided), and beyond the window."""
    write_prompt_wav(cli.work / "tune.wav", seconds=2, rate=44_100)
    common = ["--model", MELODY, "--melody", "tune.wav", "--seed", 2]
    assert_ok(cli(*common, "--prompt", "synth pop", "--max-steps", 40, "-o", "pop.wav"))
    assert sf.info(cli.work / "pop.wav").frames == 37 * HOP
    meta = json.loads((cli.work / "pop.wav.json").read_text())
    assert meta["melody"] == {
        "file": "tune.wav", "sample_rate": 44100, "channels": 2, "duration_s": 2.0,
    }  # fmt: skip
    assert meta["guidance"] == 3.0 and meta["audio_prompt"] is None
    r = cli(*common, "--unconditional", "--guidance", 2, "--max-steps", 20, "-o", "tune-only.wav")
    assert_ok(r)
    meta = json.loads((cli.work / "tune-only.wav.json").read_text())
    assert meta["prompt"] is None and meta["guidance"] == 2.0
    assert sf.info(cli.work / "tune-only.wav").frames == 17 * HOP
    assert_ok(cli(*common, "--prompt", "x", "--duration", 40, "-q", "-o", "long.wav"))
    assert sf.info(cli.work / "long.wav").frames == 40 * 50 * HOP
    assert json.loads((cli.work / "long.wav.json").read_text())["windows"] == 2


def test_melody_steps_limit_counts_the_prefix(cli):
    """After loading, a Melody pass gets the positions its prefix (235 chroma + 3 text) leaves."""
    r = cli("--prompt", "x", "--model", MELODY, "--max-steps", 1811)
    assert r.returncode == 2 and "--max-steps must be at most 1810 for this model" in r.stderr, (
        r.stderr
    )
    assert r.stderr.strip().splitlines()[-1].startswith("musicgen-cli: error: ")


def test_library_warnings_are_one_line(cli):
    r = cli("--prompt", "x", "--model", TINY, "--max-steps", 10, "-q", "--no-metadata",
            env={"MUSICGEN_MLX_BLAS": "/no/such/libblas.so"})  # fmt: skip
    assert_ok(r)
    warning = [line for line in r.stderr.splitlines() if "/no/such/libblas.so" in line]
    assert len(warning) == 1 and warning[0].startswith("musicgen-cli: warning: "), r.stderr


def test_melody_needs_a_melody_model(cli):
    write_prompt_wav(cli.work / "tune.wav")
    before = files(cli.work)
    r = cli("--prompt", "x", "--model", TINY, "--melody", "tune.wav", "--max-steps", 10)
    assert r.returncode == USAGE and r.stderr.count("\n") == 1, r.stderr
    assert "--melody needs a MusicGen-Melody model" in r.stderr
    assert files(cli.work) == before


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux player lookup")
def test_play(cli, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "played.txt"
    player = bin_dir / "paplay"
    player.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    player.chmod(0o755)
    args = ["--prompt", "x", "--model", TINY, "--max-steps", 10, "-q", "--play", "--no-metadata"]
    assert_ok(cli(*args, "--output", "p.wav", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}))
    assert log.read_text().split() == ["p.wav"]
    # no player anywhere: a clear message, and the file is still written
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(*args, "--output", "q.wav", env={"PATH": str(empty)})
    assert_ok(r)
    assert "no audio player found" in r.stderr and (cli.work / "q.wav").exists()


# ------------------------------------------------------------------------------------ bad input


def broken_checkpoint(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"ckpt-{how}"
    shutil.copytree(TINY, folder)
    config = json.loads((folder / "config.json").read_text())
    if how == "model-type":
        config["model_type"] = "bark"
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "no-tokenizer":
        (folder / "spiece.model").unlink()
    elif how == "generation-config":
        (folder / "generation_config.json").write_text("garbage{")
    elif how == "wider-config":  # weights that do not fit the config
        config["decoder"]["hidden_size"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    else:  # a truncated weights file
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


BAD = {
    "no prompt": ([], "--prompt"),
    "empty prompt": (["--prompt", ""], "empty"),
    "blank prompt": (["--prompt", "   "], "empty"),
    "empty prompts file": (["--prompts-file", "blank.txt"], "no prompts"),
    "missing prompts file": (["--prompt", "x", "--prompts-file", "nope.txt"], "nope.txt"),
    "steps below minimum": (["--prompt", "x", "--max-steps", "3"], "at least 4"),
    "steps above maximum": (["--prompt", "x", "--max-steps", "2049"], "at most 2048"),
    "steps not a number": (["--prompt", "x", "--max-steps", "ten"], "invalid int"),
    "steps and duration": (["--prompt", "x", "--max-steps", "9", "--duration", "1"], "not both"),
    "zero duration": (["--prompt", "x", "--duration", "0"], "positive"),
    "negative duration": (["--prompt", "x", "--duration", "-2"], "positive"),
    "absurd duration": (["--prompt", "x", "--duration", "99999"], "at most 3600 s"),
    "stride without duration": (["--prompt", "x", "--extend-stride", "10"], "goes with --duration"),
    "zero stride": (["--prompt", "x", "--duration", "50", "--extend-stride", "0"], "positive"),
    "stride beyond window": (
        ["--prompt", "x", "--duration", "50", "--extend-stride", "30"],
        "less than this model's window of 30 s",
    ),
    "stride beyond window, one pass": (
        ["--prompt", "x", "--duration", "10", "--extend-stride", "30"],
        "less than this model's window of 30 s, got 30",
    ),
    "unconditional with prompt": (["--unconditional", "--prompt", "x"], "takes no --prompt"),
    "unconditional with guidance": (["--unconditional", "--guidance", "2"], "no effect"),
    "drop prompt without audio": (["--prompt", "x", "--no-include-prompt"], "--audio-prompt"),
    "missing audio prompt": (["--prompt", "x", "--audio-prompt", "nope.wav"], "does not exist"),
    "audio prompt not audio": (["--prompt", "x", "--audio-prompt", "blank.txt"], "cannot read"),
    "missing melody": (
        ["--prompt", "x", "--melody", "nope.wav"],
        "--melody nope.wav does not exist",
    ),
    "melody not audio": (["--prompt", "x", "--melody", "blank.txt"], "cannot read --melody"),
    "audio prompt too long for steps": (
        ["--prompt", "x", "--audio-prompt", "riff.wav", "--max-steps", "2030"],
        "at most 2023 for this model after the 0.5 s audio prompt",
    ),
    "audio prompt longer than a pass": (
        ["--prompt", "x", "--audio-prompt", "long.wav"],
        "the 45 s audio prompt is too long for this model: one pass holds 40.88 s of prompt at most",
    ),
    "top-k zero": (["--prompt", "x", "--top-k", "0"], "--top-k"),
    "top-p above one": (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    "top-p negative": (["--prompt", "x", "--top-p", "-0.1"], "--top-p"),
    "temperature zero": (["--prompt", "x", "--temperature", "0"], "--temperature"),
    "negative guidance": (["--prompt", "x", "--guidance", "-1"], "--guidance"),
    "unknown extension": (["--prompt", "x", "--output", "x.mp3"], ".mp3"),
    "no extension": (["--prompt", "x", "--output", "song"], "unknown output format"),
    "missing output folder": (["--prompt", "x", "--output", "nowhere/x.wav"], "does not exist"),
    "missing output dir": (["--prompt", "x", "--output-dir", "nowhere"], "does not exist"),
    "output and output-dir": (
        ["--prompt", "x", "--output", "a.wav", "--output-dir", "."],
        "not both",
    ),
    "ogg above 192 kHz": (
        ["--prompt", "x", "--output", "x.ogg", "--sample-rate", "200000"],
        "--sample-rate must be at most 192000 Hz for .ogg files",
    ),
    "revision of a folder": (
        ["--prompt", "x", "--revision", "main"],
        "--revision is for a hub repo id",
    ),
    "infinite temperature": (
        ["--prompt", "x", "--temperature", "inf"],
        "--temperature must be a finite",
    ),
    "infinite stride": (
        ["--prompt", "x", "--duration", "40", "--extend-stride", "inf"],
        "--extend-stride must be a finite number, got inf",
    ),
    "empty output": (["--prompt", "x", "--output", ""], "--output is empty"),
    "output is a folder": (["--prompt", "x", "--output", "."], "is a folder (use --output-dir)"),
    "output without a name": (
        ["--prompt", "x", "--output", ".wav"],
        "no name before its extension",
    ),
    "empty output dir": (["--prompt", "x", "--output-dir", ""], "--output-dir is empty"),
    "prefix too long": (["--prompt", "x", "--prefix", "p" * 240], "file name is too long"),
    "output too long": (["--prompt", "x", "--output", "o" * 240 + ".wav"], "file name is too long"),
    "sidecar is a folder": (
        ["--prompt", "x", "--output", "taken.wav"],
        "the metadata cannot go there",
    ),
    "audio prompt with NaN": (["--prompt", "x", "--audio-prompt", "nan.wav"], "NaN or infinite"),
    "audio prompt not a file": (
        ["--prompt", "x", "--audio-prompt", "/dev/null"],
        "/dev/null is not a regular file",
    ),
    "empty model": (["--prompt", "x", "--model", ""], "--model is empty"),
    "bad dtype": (["--prompt", "x", "--dtype", "int8"], "--dtype"),
    "bad quantize": (["--prompt", "x", "--quantize", "3"], "--quantize"),
    "loudness without normalize": (["--prompt", "x", "--loudness", "-20"], "--normalize loudness"),
    "loudness above 0 LUFS": (
        ["--prompt", "x", "--normalize", "loudness", "--loudness", "3"],
        "--loudness must be in [-70, 0] LUFS, got 3",
    ),
    "bad normalize": (["--prompt", "x", "--normalize", "lufs"], "--normalize"),
    "unknown flag": (["--prompt", "x", "--louder"], "--louder"),
}
USAGE = 2


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(cli, case):
    args, expect = BAD[case]
    (cli.work / "blank.txt").write_text("# only a comment\n\n")
    write_prompt_wav(cli.work / "riff.wav")
    write_prompt_wav(cli.work / "long.wav", seconds=45, rate=8000, channels=1)
    (cli.work / "taken.wav.json").mkdir()
    import numpy as np

    sf.write(cli.work / "nan.wav", np.full((8000, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    before = files(cli.work)
    r = cli("--model", TINY, *args)
    assert r.returncode == USAGE, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("musicgen-cli: error: "), r.stderr
    assert expect in r.stderr
    assert r.stdout == "" and files(cli.work) == before


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "offline not cached",
        "bad repo id",
        "model type",
        "corrupt weights",
        "a file",
        "no tokenizer",
        "corrupt generation config",
        "weights unlike the config",
    ],
)
def test_bad_model(cli, tmp_path, case):
    model, expect = {
        "missing folder": ("./no-such-model", "no such model folder"),
        "offline not cached": ("facebook/musicgen-small", "--model PATH"),
        "bad repo id": (
            "facebook/musicgen small",
            "neither a local folder nor a Hugging Face repo id",
        ),
        "model type": (broken_checkpoint(tmp_path, "model-type"), "model type 'bark'"),
        "corrupt weights": (broken_checkpoint(tmp_path, "truncated"), "corrupt or truncated"),
        "a file": (TINY / "config.json", "is a file"),
        "no tokenizer": (broken_checkpoint(tmp_path, "no-tokenizer"), "has no spiece.model"),
        "corrupt generation config": (
            broken_checkpoint(tmp_path, "generation-config"),
            "generation_config.json (JSONDecodeError",
        ),
        "weights unlike the config": (
            broken_checkpoint(tmp_path, "wider-config"),
            "(is it a complete MusicGen checkpoint?)",
        ),
    }[case]
    cache = tmp_path / "own-cache"  # a failed conversion must leave no entry behind
    r = cli("--prompt", "x", "--model", model, env={"MUSICGEN_MLX_CACHE": str(cache)})
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (a conversion bar may come first)
    assert last.startswith("musicgen-cli: error: ") and expect in last, r.stderr
    assert "Traceback" not in r.stderr
    assert files(cli.work) == []
    if case != "weights unlike the config":  # that one converts (faithfully), then fails to load
        assert not cache.exists() or files(cache) == []


def without_dac_override() -> list[str]:
    """As root: a command prefix that drops the capabilities which let root write anywhere."""
    if os.name != "posix" or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")  # util-linux
    if setpriv is None:
        pytest.skip("running as root and util-linux setpriv is missing")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_write_error_is_one_line(cli):
    """A file size limit (as a full disk would) stops the write: one line, exit 1, nothing left."""
    prlimit = shutil.which("prlimit")  # util-linux
    if prlimit is None:
        pytest.skip("util-linux prlimit is missing")
    args = ["--prompt", "x", "--model", TINY, "-q", "--duration", 10]
    assert_ok(cli(*args, "--output", "first.wav"))  # converts and compiles without the limit
    r = cli(*args, "--output", "big.wav", wrap=[prlimit, "--fsize=200000", "--"])
    assert r.returncode == 1
    assert r.stderr == "musicgen-cli: error: cannot write big.wav: File too large\n"
    assert files(cli.work) == ["first.wav", "first.wav.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_output_folder_not_writable(cli):
    locked = cli.work / "locked"
    locked.mkdir(mode=0o500)
    wrap = without_dac_override()
    try:
        # the folder really refuses this user (root without CAP_DAC_OVERRIDE included)
        probe = subprocess.run(
            [*wrap, sys.executable, "-c", f"open({str(locked / 'probe')!r}, 'w')"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
        for args in (["--output-dir", locked], ["--output", locked / "x.wav"]):
            r = cli("--prompt", "x", "--model", TINY, *args, wrap=wrap)
            assert r.returncode == USAGE, r.stderr
            assert r.stderr.count("\n") == 1, r.stderr
            assert r.stderr.startswith("musicgen-cli: error: ") and "not writable" in r.stderr
            assert r.stdout == "" and files(locked) == [] and files(cli.work) == ["locked"]
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("broken_entry", [False, True], ids=["empty", "a broken entry"])
def test_conversion_cache_not_writable(cli, tmp_path, broken_entry):
    """A read-only cache without a usable entry for the model (none, or a damaged one it cannot
    remove): the message names the cache, not the model."""
    cache = tmp_path / "read-only-cache"
    env = {"MUSICGEN_MLX_CACHE": str(cache)}
    if broken_entry:
        converted = cli("convert", "--model", TINY, "-q", env=env)
        assert_ok(converted)
        entry = Path(converted.stdout.strip())  # convert prints the entry's folder
        weights = entry / "decoder.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # truncated
    else:
        cache.mkdir()
    cache.chmod(0o500)
    try:
        r = cli("--prompt", "x", "--model", TINY, env=env, wrap=without_dac_override())
        assert r.returncode == 1, r.stderr
        assert r.stderr.splitlines()[-1] == (
            f"musicgen-cli: error: cannot convert {TINY}: the conversion cache {cache} is not "
            "writable (set MUSICGEN_MLX_CACHE to a writable folder)"
        )
        assert "Traceback" not in r.stderr
    finally:
        cache.chmod(0o700)


def fake_hub_cache(root: Path, repo: str, config: dict) -> Path:
    """A Hugging Face cache holding only `repo`'s config.json (as a download of it would leave)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    return root


def test_hub_repo_limits_checked_before_loading(cli, tmp_path):
    """A repo id's step limits come from its cached config.json, else the published ones: bad
    lengths are refused (exit 2) before any download, conversion or cache lookup of the weights."""
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    env = {"HF_HUB_CACHE": str(empty)}
    for args, expect in (
        (["--max-steps", 3000], "at most 2048"),
        (["--max-steps", 2], "at least 4"),
    ):
        r = cli("--prompt", "x", "--model", "facebook/musicgen-small", *args, env=env)
        assert r.returncode == USAGE and expect in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    config = json.loads((TINY / "config.json").read_text())
    config["decoder"]["max_position_embeddings"] = 64
    env = {"HF_HUB_CACHE": str(fake_hub_cache(tmp_path / "hub", "someone/tiny", config))}
    r = cli("--prompt", "x", "--model", "someone/tiny", "--max-steps", 100, env=env)
    assert r.returncode == USAGE and "at most 64 for this model" in r.stderr, r.stderr
    # within the cached config's limits: on to loading, which fails (no weights cached) with exit 1
    r = cli("--prompt", "x", "--model", "someone/tiny", "--max-steps", 50, env=env)
    assert r.returncode == 1 and "is not in the Hugging Face cache" in r.stderr, r.stderr
    assert files(cli.work) == []


def test_unreachable_hub_falls_back_to_the_hf_cache(cli, tmp_path):
    """HF_HUB_OFFLINE unset but no network (a refused endpoint): a cached repo is used after one warning;
    a repo that is not cached is one error line, with no warning before it."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(TINY, snapshot)
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = ["--prompt", "x", "--max-steps", 10, "-q"]
    r = cli(*args, "--model", "someone/not-cached", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "someone/not-cached" in r.stderr and "the Hub cannot be reached" in r.stderr
    r = cli(*args, "--model", "someone/tiny", "--output", "x.wav", env=env)
    assert_ok(r)
    assert "Hugging Face Hub unreachable" in r.stderr and "using the local cache" in r.stderr
    assert files(cli.work) == ["x.wav", "x.wav.json"]


def test_conversion_cache_that_is_a_file(cli, tmp_path):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    r = cli("--prompt", "x", "--model", TINY, env={"MUSICGEN_MLX_CACHE": str(not_a_folder)})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"the conversion cache {not_a_folder} is not a folder" in r.stderr
    assert files(cli.work) == []


def test_version_and_help(cli):
    r = cli("--version")
    assert_ok(r)
    assert r.stdout.startswith("musicgen-cli ")
    r = cli("--help")
    assert_ok(r)
    for flag in (
        "--prompt",
        "--prompts-file",
        "--output-dir",
        "--duration",
        "--extend-stride",
        "--audio-prompt",
        "--no-include-prompt",
        "--unconditional",
        "--play",
        "--quantize",
    ):
        assert flag in r.stdout


# ------------------------------------------------------------------------------------ Ctrl+C


def interrupt_when(
    cli, args: list, cache: Path, progress: bytes, at_least: int, sig=signal.SIGINT, code=130
) -> None:
    """Run the CLI, send a real `sig` once `progress` (a regex with one number) reaches `at_least`,
    and check the clean exit: `code`, one short line, no traceback, no output, nothing in the work
    folder."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.musicgen_cli", *map(str, args)],
        cwd=cli.work,
        env=cli.env_for({"MUSICGEN_MLX_CACHE": str(cache)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a background job's SIGINT may be ignored by the shell that started pytest
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        counts = [int(n) for n in re.findall(progress, seen)]
        if counts and max(counts) >= at_least:
            break
    assert proc.poll() is None, seen.decode(errors="replace")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].strip() == "musicgen-cli: interrupted"
    assert "Traceback" not in err and out == b""
    assert files(cli.work) == []


@pytest.mark.parametrize(
    "sig, code",
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_sigint_during_generation_leaves_nothing(cli, tmp_path, sig, code):
    """A real SIGINT (or SIGTERM, or SIGHUP: a closed terminal) while the decoder runs: exit 128 +
    the signal, one short line, no files, no traceback, and a conversion cache with its finished
    entry and no temporary folder."""
    cache = tmp_path / "own-cache"  # converted by this run
    prompts = [a for i in range(4) for a in ("--prompt", f"prompt {i}")]
    args = [*prompts, "--model", TINY, "--max-steps", "2048", "--output", "long.wav"]
    # Wait for at least 10 decoder steps: the run is well inside the loop (and past MLX's one-off
    # `system("g++ --version")` check, during which glibc ignores SIGINT).
    interrupt_when(cli, args, cache, rb"(\d+)/2048 \[", 10, sig, code)
    entries = files(cache)
    assert entries and not [e for e in entries if e.startswith(".tmp-")], entries


@pytest.mark.slow
def test_sigint_during_conversion_leaves_no_cache_entry(cli, tmp_path):
    """A real SIGINT while a checkpoint is being converted (a random 6-layer musicgen-small-wide model,
    ~0.6 GB in 20 shards, so the conversion lasts seconds): exit 130, one short line, and the
    conversion cache holds neither an entry nor a temporary folder."""
    from apps.random_checkpoint import shape_config, write_checkpoint

    config = shape_config("small")
    config["decoder"]["num_hidden_layers"] = 6
    model = tmp_path / "random-small-6"
    write_checkpoint("small", model, "float16", "safetensors", "32MB", config=config)
    cache = tmp_path / "own-cache"
    interrupt_when(
        cli, ["convert", "--model", model], cache, rb"Converting [^:]*: (\d+) tensors", 20
    )
    assert not cache.exists() or files(cache) == [], files(cache)


# ------------------------------------------------------------------------------------ convert, cache


def test_convert_and_cache(cli, tmp_path):
    env = {"MUSICGEN_MLX_CACHE": str(tmp_path / "cache")}
    r = cli("convert", "--model", TINY, "--dtype", "float16", env=env)
    assert_ok(r)
    entry = Path(r.stdout.strip())
    assert entry.parent == tmp_path / "cache" and (entry / "manifest.json").exists()
    assert "float16) converted" in r.stderr
    r = cli("convert", "--model", TINY, "--dtype", "float16", env=env)
    assert_ok(r)
    assert Path(r.stdout.strip()) == entry and "already converted" in r.stderr

    # the compiled kernels, the bench's checkpoints and anything else in the folder are not
    # conversions: neither listed nor cleared; a killed conversion's leftover is shown, then cleared
    for other in ("kernels", "bench", "Documents", ".ssh"):
        (tmp_path / "cache" / other).mkdir()
        (tmp_path / "cache" / other / "kept").write_text("x")
    leftover = tmp_path / "cache" / f".tmp-{entry.name}-999999-0123abcd"
    leftover.mkdir()
    (leftover / "decoder.safetensors").write_bytes(bytes(1500))
    r = cli("cache", "list", env=env)
    assert_ok(r)
    assert "1 entry" in r.stdout and str(TINY) in r.stdout and "float16" in r.stdout
    assert "BROKEN" not in r.stdout and "kernels" not in r.stdout
    assert (
        "and 1 folder (1.5 KB) left by interrupted conversions: 'musicgen-cli cache clear'"
        in r.stdout
    )
    r = cli("cache", "list", "--json", env=env)
    assert [e["dtype"] for e in json.loads(r.stdout)] == ["float16"]
    r = cli("cache", "clear", env=env)
    assert_ok(r)
    assert r.stdout.startswith("Removed 1 entry")
    assert "0 entries" in cli("cache", "list", env=env).stdout
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".ssh", "Documents", "bench", "kernels"
    ]  # fmt: skip

    r = cli("cache", "purge", env=env)
    assert r.returncode == USAGE and "invalid choice" in r.stderr
    r = cli("convert", "--model", "./missing", env=env)
    assert r.returncode == 1 and r.stderr.startswith("musicgen-cli: error: no such model folder")
