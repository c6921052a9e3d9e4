"""The random-checkpoint writer and musicgen-bench, on the tiny fixture's shape (structure and values only)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from apps import huge_pages, musicgen_bench
from apps.random_checkpoint import shape_config, shapes, tensor_specs, write_checkpoint
from musicgen import _blas, cpu_kernels
from musicgen.generate import with_unconditional_rows
from musicgen.weights import load_state_dict

TINY = Path(__file__).parent / "fixtures" / "tiny-musicgen"
PRECISION_SCRIPT = Path(__file__).parents[1] / "scripts" / "precision_accuracy.py"


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("random-tiny")
    write_checkpoint("tiny", out, shard_size="400KB", config=tiny_config)
    return out


def test_published_shapes_ship_with_the_package():
    published = {
        "small",
        "medium",
        "large",
        "melody",
        "stereo-small",
        "stereo-medium",
        "stereo-large",
    }
    assert published <= set(shapes())
    small = shape_config("small")
    assert small["decoder"]["hidden_size"] == 1024 and small["decoder"]["num_hidden_layers"] == 24
    # parameters of the published musicgen-small (T5 embedding stored once, as save_pretrained does)
    assert sum(int(np.prod(s[1])) for s in tensor_specs(small)) == 588_990_022
    # musicgen-melody: no cross-attention, a chroma projection (transformers' count, T5 embedding once)
    melody = shape_config("melody")
    assert sum(int(np.prod(s[1])) for s in tensor_specs(melody)) == 1_554_244_166
    names = {s[0] for s in tensor_specs(melody)}
    assert "audio_enc_to_dec_proj.weight" in names and not any("encoder_attn" in n for n in names)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("huge")


def test_names_and_shapes_match_a_transformers_checkpoint(tiny_checkpoint):
    expected = {
        k: v["shape"]
        for k, v in safetensors_header(TINY / "model.safetensors").items()
        if k != "__metadata__"
    }
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got = {}
    for shard in shards:
        header = safetensors_header(tiny_checkpoint / shard)
        assert all(index["weight_map"][k] == shard for k in header if k != "__metadata__")
        got.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    assert got == expected
    assert index["metadata"]["total_size"] == 4 * sum(int(np.prod(s)) for s in got.values())
    for name in ("config.json", "generation_config.json", "spiece.model"):
        assert (tiny_checkpoint / name).is_file()


def test_melody_names_and_shapes_match_a_transformers_checkpoint(tmp_path):
    melody = Path(__file__).parent / "fixtures" / "tiny-musicgen-melody"
    write_checkpoint("tiny", tmp_path, config=json.loads((melody / "config.json").read_text()))
    expected = safetensors_header(melody / "model.safetensors")
    got = safetensors_header(tmp_path / "model.safetensors")
    assert {k: v["shape"] for k, v in got.items() if k != "__metadata__"} == {
        k: v["shape"] for k, v in expected.items() if k != "__metadata__"
    }


def test_values_are_sensible(tiny_checkpoint):
    w = load_state_dict(tiny_checkpoint)
    assert all(bool(mx.all(mx.isfinite(v))) for v in w.values())
    p = "audio_encoder.decoder.layers.0.conv.parametrizations.weight"
    g, v = w[f"{p}.original0"], w[f"{p}.original1"]
    ratio = g.reshape(-1) / mx.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(axis=1))
    assert float(ratio.min()) >= 0.8 and float(ratio.max()) <= 1.2
    fc1 = w["decoder.model.decoder.layers.0.fc1.weight"]
    assert abs(float(fc1.square().mean()) * fc1.shape[1] - 1) < 0.2  # N(0, 1/fan_in)
    ln = w["decoder.model.decoder.layers.0.final_layer_norm.weight"]
    assert abs(float(ln.mean()) - 1) < 0.1
    q = "audio_encoder.quantizer.layers.0.codebook"
    assert mx.array_equal(w[f"{q}.embed"], w[f"{q}.embed_avg"])
    assert float(w[f"{q}.inited"][0]) == 1.0


def test_torch_zip_bin_reads_back(tmp_path, tiny_config, tiny_checkpoint):
    write_checkpoint("tiny", tmp_path, dtype="float16", fmt="bin", config=tiny_config)
    assert (tmp_path / "pytorch_model.bin").is_file()
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as zf:
        assert "pytorch_model/data.pkl" in zf.namelist()
    fp16, fp32 = load_state_dict(tmp_path), load_state_dict(tiny_checkpoint)
    assert fp16.keys() == fp32.keys()
    for k, v in fp16.items():
        assert v.dtype == mx.float16 and v.shape == fp32[k].shape
        assert mx.allclose(v.astype(mx.float32), fp32[k], rtol=1e-3, atol=1e-4), k


def test_the_bench_does_not_time_building_the_kernels(tmp_path):
    """Its workers use an empty conversion cache: the kernels built once are copied into it."""
    musicgen_bench.share_kernels(tmp_path)
    built = cpu_kernels.library()
    copied = sorted(p.name for p in (tmp_path / "kernels").glob("*")) if built else []
    assert copied == ([built.name] if built else [])
    if built:
        assert (tmp_path / "kernels" / built.name).read_bytes() == built.read_bytes()


def test_step_stats_windows():
    ends = [0.1 * i for i in range(1, 202)]  # 200 steps of 100 ms
    stats = musicgen_bench.step_stats(ends)
    assert stats["median_ms"] == pytest.approx(100) and stats["at_100_ms"] == pytest.approx(100)
    assert stats["at_750_ms"] is None and stats["at_1450_ms"] is None


def test_flatness_is_late_over_early_steps():
    """A 30 s run whose steps take 100 ms until step 700 and 130 ms from then on."""
    ends = list(itertools.accumulate([0.1] * 700 + [0.13] * 803, initial=0.0))
    run = musicgen_bench.step_stats(ends)
    ours = {
        "runs": [run],
        "matvec_bytes_per_s": {"x @ W.T": 20e9},
        "step_bytes": {
            "100": {"weights": 1e9, "kv": 4e7, "total": 1.04e9},
            "1450": {"weights": 1e9, "kv": 5.6e8, "total": 1.56e9},
        },
        "paired_roofline": {"100": {"step_ms": 80.0}, "1450": {"step_ms": 100.0}},
    }
    ref = {"runs": [{"at_100_ms": 160.0, "at_1450_ms": 168.0}]}
    report = {"ours": ours, "transformers": ref, "roofline": musicgen_bench.roofline(ours)}
    assert run["at_100_ms"] == pytest.approx(100) and run["at_1450_ms"] == pytest.approx(130)
    assert musicgen_bench.flatness(report) == {
        "ours": pytest.approx(1.3),
        "transformers": pytest.approx(1.05),
        "back_to_back": pytest.approx(1.25),
        "bound": pytest.approx(1.5),
    }


def test_bench_end_to_end_on_tiny_shape(tiny_checkpoint, capsys):
    steps, short = 12, 6
    musicgen_bench.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--steps",
            str(steps),
            "--short-steps",
            str(short),
            "--matvec-size",
            "256",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    ours = report["ours"]
    assert report["steps"] == [steps, short] and "transformers" not in report
    assert ours["backend"] in ("CPU", "Metal", "CUDA") and ours["dtype"] == "float32"
    assert ours["cpu_kernels"] is (ours["backend"] == "CPU" and cpu_kernels.enabled())
    assert [r["steps"] for r in ours["runs"]] == [steps, short]
    assert [r["samples"] for r in ours["runs"]] == [(steps - 3) * 640, (short - 3) * 640]
    for run in ours["runs"]:
        assert run["audio_s"] == pytest.approx(run["samples"] / 32000)
        assert run["rtf"] == pytest.approx(run["wall_s"] / run["audio_s"])
        assert 0 < run["decode_s"] < run["wall_s"] and run["median_ms"] > 0
    assert ours["max_rss_bytes"] > ours["mlx_peak_bytes"] > 0
    # the worker reports the BLAS settings it ran with: this process's, plus what the loader set
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(musicgen_bench.BLAS_ENV_PREFIXES) and k != "GLIBC_TUNABLES"
    }
    assert inherited.items() <= ours["blas_env"].items()
    # workers start with glibc's huge page tunable where the kernel gives huge pages on request
    assert ours["huge_pages"] is (huge_pages.asked() or huge_pages.wanted())
    assert huge_pages.asked(ours["blas_env"]) is ours["huge_pages"]
    assert all(k.startswith(musicgen_bench.BLAS_ENV_PREFIXES) for k in ours["blas_env"])
    if _blas.kind == "openblas":
        assert "OPENBLAS_THREAD_TIMEOUT" in ours["blas_env"]
    assert report["load"]["cold_load_s"] > 0 and ours["load_s"] > 0
    roof = report["roofline"]
    pieces = set()
    if _blas.small_product_limit():  # OpenBLAS's AVX-512 kernels: one stream, and two
        pieces = {"x @ W.T in pieces", "x @ W.T in pieces, two streams"}
    assert set(roof["matvec_GBps"]) == {"W @ x", "x @ W.T", "x @ W"} | pieces
    assert roof["100"]["measured_ms"] is None  # 12 steps do not reach position 100
    hidden, layers = 16, 2  # the tiny decoder: self-attention K/V of 2 CFG rows, positions 0..100
    assert roof["100"]["kv_MB"] * 1e6 == pytest.approx(2 * 2 * layers * hidden * 4 * 101)
    assert roof["paired"] == {}  # 12 steps reach none of the positions probed
    bound = (hidden * 4 * 2 * 2 * layers * 1451 + roof["1450"]["weights_MB"] * 1e6) / (
        hidden * 4 * 2 * 2 * layers * 101 + roof["100"]["weights_MB"] * 1e6
    )
    assert report["flatness"] == {"ours": None, "back_to_back": None, "bound": pytest.approx(bound)}

    musicgen_bench.print_table(report)
    table = capsys.readouterr().out.splitlines()
    assert (
        table[-1]
        == f"flatness, median step 1400-1500 / 50-150: ours -, back to back -, bound {bound:.2f}x"
    )
    row = next(line for line in table if line.startswith("decoder step, median"))
    assert row.split()[-2:] == [f"{ours['runs'][0]['median_ms']:.1f}", "ms"]


def test_paired_roofline_on_tiny_shape(tiny_checkpoint):
    from musicgen import MusicGen

    model = MusicGen.from_pretrained(str(tiny_checkpoint), progress=False)
    out = musicgen_bench.paired_roofline(model, "happy rock", {"5": 5, "40": 40}, 64, rounds=2)
    assert set(out) == {"5", "40"}
    for name, position in (("5", 5), ("40", 40)):
        r = out[name]
        assert r["step_ms"] > 0 and r["matvec_GBps"] > 0
        # the bound is the bytes the step reads at the middle of the timed steps / the bandwidth
        cross = model.decoder.cross_states(
            *with_unconditional_rows(*model.encode_text(["happy rock"]))
        )
        step = model.decoder.token_step(cross, model.decoder.make_cache(2, 1))
        total = step.bytes_per_step(position + 4)["total"]
        assert r["bound_ms"] == pytest.approx(1e3 * total / (r["matvec_GBps"] * 1e9))
        assert r["fraction_of_bound"] == pytest.approx(r["bound_ms"] / r["step_ms"])


def precision_accuracy(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PRECISION_SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["tiny-musicgen", "tiny-musicgen-melody"])
def test_precision_accuracy_script_on_tiny_fixture(name):
    frames = 20
    fixture = TINY.parent / name
    r = precision_accuracy(
        "--model",
        str(fixture),
        "--options",
        "float32",
        "float16",
        "--frames",
        str(frames),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["frames"] == frames and list(report["options"]) == ["float32", "float16"]
    positions = frames + 3  # the steps of the delay pattern (3 for the 4 mono codebooks)
    # float32 against itself: the harness compares like with like
    assert report["options"]["float32"] == {
        "logits_rel_err": 0.0,
        "argmax_agree": 1.0,
        "argmax_count": 2 * 4 * positions,
        "greedy_agree": 1.0,
        "greedy_count": 4 * frames,
        "first_differing_frame": None,
    }
    half = report["options"]["float16"]
    assert 1e-5 < half["logits_rel_err"] <= 2e-2  # the bound of test_float16_decoder_stays_close
    assert half["argmax_count"] == 2 * 4 * positions and half["greedy_count"] == 4 * frames


def test_precision_accuracy_script_rejects_bad_input():
    r = precision_accuracy("--model", str(TINY), "--options", "float8")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].endswith("error: unknown option 'float8'")
    missing = TINY.parent / "no-such-model"
    r = precision_accuracy("--model", str(missing))
    assert r.returncode == 1 and r.stderr == f"precision_accuracy: no such folder: {missing}\n"


def test_pieces_rates_script_smoke_run():
    """scripts/pieces_rates.py measures each product form (tiny sizes here) and rejects bad counts."""
    script = Path(__file__).parents[1] / "scripts" / "pieces_rates.py"
    cmd = [sys.executable, str(script), "--layers", "1", "--matvec-size", "512", "--repeats", "1"]
    r = subprocess.run([*cmd, "--lstm-steps", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith(
        f"; pieces of <= {_blas.small_product_limit() or 1_000_000} multiply-adds"
    )
    forms = ["whole", "pieces", "pieces, two streams"]
    labels = ["1 layers, independent", "1 layers, chain", "512^2, 1 rows", "512^2, 2 rows"]
    rows = [line.split("|") for line in lines[1:]]
    assert [(a.strip(), b.split("  ")[0].strip()) for a, b in rows] == [
        (label, form) for label in [*labels, "LSTM, 4 steps"] for form in forms
    ]
    assert all("GB/s" in b for _, b in rows[:12]) and all(b.endswith(" ms") for _, b in rows)
    r = subprocess.run([*cmd, "--lstm-steps", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].endswith("argument --lstm-steps: must be at least 1, not 0")


def bench(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "apps.musicgen_bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def test_bench_bad_input_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    r = bench("--model", str(missing), "--steps", "10")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"musicgen-bench: no such folder: {missing}\n"
    r = bench("--model", str(TINY), "--steps", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--steps must be > 3" in r.stderr
    nowhere = tmp_path / "bin" / "python"
    r = bench("--model", str(TINY), "--compare-transformers", str(nowhere))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"--compare-transformers {nowhere}: No such file or directory" in r.stderr
    no_torch = tmp_path / "python"  # an interpreter that cannot import torch and transformers
    no_torch.write_text("#!/bin/sh\nexit 3\n")
    no_torch.chmod(0o755)
    r = bench("--model", str(TINY), "--compare-transformers", str(no_torch))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "it cannot import torch and transformers (exit 3)" in r.stderr


def test_bench_ctrl_c_stops_cleanly(tmp_path):
    """A real SIGINT to the bench and its worker (one process group, as a terminal sends it): exit 130,
    no traceback, no worker left, the private conversion cache removed."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "apps.musicgen_bench", "--model", str(TINY), "--steps", "2000"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob("musicgen-bench-cache-*/*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # until a worker has written into the private cache
    assert any(tmp_path.glob("musicgen-bench-cache-*/*")), "the bench never got going"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not any(tmp_path.glob("musicgen-bench-cache-*"))  # (MLX keeps its own mlx/ there)
