"""musicgen-bench: load time, T5, decoder ms/step, EnCodec, end-to-end speed, memory and the roofline.

    musicgen-bench                                   # random-weight musicgen-small, 30 s + 10 s generations
    musicgen-bench --shape medium --steps 200        # a shorter run on another published shape
    musicgen-bench --model facebook/musicgen-small --dtype float16 --quantize 8 --json
    musicgen-bench --compare-transformers /tmp/ref/bin/python --repeats 2

Without --model the checkpoint is a random-weight one of a published shape, written once (Hugging Face layout)
to bench/<shape> in the conversion cache root ($MUSICGEN_MLX_CACHE, default ~/.cache/musicgen-mlx). Each
measurement runs in its own process (so that peak RSS is that of one load + one generation): one process
converts the checkpoint into a private cache (cold load) and loads it again (warm), then each repeat runs one
generation process of ours and, with --compare-transformers, one of transformers in the given interpreter,
alternately. Batch 1, classifier-free guidance 3, top-k 250.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import musicgen  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from apps import huge_pages

WINDOWS = {"100": (50, 150), "750": (700, 800), "1450": (1400, 1500)}
# Flatness: the median step of the late window over that of the early one.
FLATNESS = ("1450", "100")
# Environment variables that change how the BLAS, the CPU kernels or memory allocation run (reported: a
# VM image may set them for every process).
BLAS_ENV_PREFIXES = (
    "MUSICGEN_MLX_BLAS",
    "MUSICGEN_MLX_KERNELS",
    "MUSICGEN_MLX_HUGE_PAGES",
    "GLIBC_TUNABLES",
    "OPENBLAS_",
    "GOTO_",
    "MKL_",
    "KMP_",
    "OMP_",
)
PROMPT = "80s pop track with bassy drums and synth"


# ------------------------------------------------------------------------------------------ helpers


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def step_stats(ends: list[float]) -> dict:
    """Per-step durations (s) from the times at which steps ended: median overall and per window."""
    dt = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # step i + 1 took dt[i]
    out = {"median_ms": 1e3 * median(dt[5:] or dt) if dt else None}
    for name, (lo, hi) in WINDOWS.items():
        window = dt[lo - 1 : hi - 1]
        out[f"at_{name}_ms"] = 1e3 * median(window) if len(window) >= (hi - lo) // 2 else None
    return out


def backend() -> str:
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "CPU"
    if mx.metal.is_available():
        return "Metal"
    return "CUDA" if hasattr(mx, "cuda") and mx.cuda.is_available() else "GPU"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def blas_env() -> dict[str, str]:
    """The BLAS settings in this process's environment (those musicgen's loader set included)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(BLAS_ENV_PREFIXES)}


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def matvec_bandwidth(n: int = 8192, repeats: int = 15) -> dict:
    """Bytes/s of MLX float32 matrix-vector products with an n x n matrix (three forms), medians."""
    import mlx.core as mx

    w = mx.random.normal((n, n))
    x = mx.random.normal((n,))
    mx.eval(w, x)
    return matvec_rates(w, x, repeats)


def matvec_rates(w, x, repeats: int, skip: int = 2) -> dict:
    """Median bytes/s of W @ x, x @ W.T and x @ W over `repeats` products (the first `skip` warm up),
    and of x @ W.T in small-matrix pieces, on one CPU stream and on two, where the step runs its
    products so (`_blas.small_product_limit`).

    The bound takes the fastest: the BLAS streams the same matrix at different rates in each form
    (OpenBLAS 0.3.21's AVX2 kernels on an AMD EPYC, 8192 x 8192: 15-17, 20-22 and 22 GB/s).
    """
    import mlx.core as mx

    from musicgen import _blas
    from musicgen.model import _side_stream, in_pieces, linear

    forms = {"W @ x": lambda: w @ x, "x @ W.T": lambda: x @ w.T, "x @ W": lambda: x @ w}
    if limit := _blas.small_product_limit():  # the step's form with OpenBLAS's AVX-512 kernels
        row, side, cut = x.reshape(1, -1), _side_stream(), in_pieces({"weight": w}, 1, limit)
        forms["x @ W.T in pieces"] = lambda: linear(cut, row)
        if side is not None:
            forms["x @ W.T in pieces, two streams"] = lambda: linear(cut, row, side=side)
    out = {}
    for name, product in forms.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(product())
            times.append(time.perf_counter() - t)
        out[name] = w.nbytes / median(times[skip:])
    return out


def paired_roofline(
    model, prompt: str, positions: dict[str, int], n: int, rounds: int = 5, steps: int = 8
) -> dict:
    """Generation steps at fixed positions alternated with the matvec bandwidth, back to back.

    On a shared machine the bandwidth drifts by tens of percent within minutes, so a bound measured
    once is not comparable with steps timed minutes earlier. Here each round times `steps` steps (CFG,
    top-k sampling, pipelined as in a generation) at every position, each followed by the matvec;
    per position: the median step and the bound from the median bandwidth measured next to it.
    """
    import mlx.core as mx

    from musicgen.generate import sample

    if not positions:
        return {}
    decoder = model.decoder
    step = guided_step(model, prompt, max(positions.values()) + steps + 1)
    held = model.prefix_positions(prompt)
    positions = {name: held + position for name, position in positions.items()}
    cache = step.cache
    w, x = mx.random.normal((n, n)), mx.random.normal((n,))
    keys = mx.random.split(mx.random.key(0), steps)
    mx.eval(w, x, keys, step.cross, [(c.keys, c.values) for c in cache])
    codebooks = decoder.config.num_codebooks
    times = {name: [] for name in positions}
    rates = {name: [] for name in positions}
    for _ in range(rounds):
        for name, position in positions.items():
            tokens, previous, ends = mx.zeros((2, codebooks), mx.int32), None, []
            for i in range(steps + 1):
                logits = step(tokens, position + i)
                logits = logits[1:] + (logits[:1] - logits[1:]) * 3.0
                nxt = sample(logits.reshape(codebooks, -1), keys[min(i, steps - 1)], top_k=250)
                tokens = mx.concatenate([nxt.reshape(1, -1)] * 2)
                mx.async_eval(tokens)
                if previous is not None:
                    mx.eval(previous)
                    ends.append(time.perf_counter())
                previous = tokens
            mx.eval(previous)
            times[name] += [b - a for a, b in zip(ends, ends[1:], strict=False)]
            rates[name].append(max(matvec_rates(w, x, 5).values()))
    out = {}
    for name, position in positions.items():
        total = step.bytes_per_step(position + steps // 2)["total"]
        bound = total / median(rates[name])
        out[name] = {
            "step_ms": 1e3 * median(times[name]),
            "bound_ms": 1e3 * bound,
            "matvec_GBps": median(rates[name]) / 1e9,
            "fraction_of_bound": bound / median(times[name]),
        }
    return out


def guided_step(model, prompt: str, positions: int):
    """The generation step of `prompt` with classifier-free guidance, over a cache of `positions`
    (for Melody, after its conditioning prefix: `MusicGen.prefix_positions`)."""
    from musicgen.generate import with_unconditional_rows

    decoder = model.decoder
    cross = decoder.cross_states(*with_unconditional_rows(*model.encode_text([prompt])))
    cache = decoder.make_cache(2, model.prefix_positions(prompt) + positions)
    return decoder.token_step(cross, cache)


def step_bytes(model, prompt: str, positions: dict[str, int]) -> dict:
    """Bytes the generation step reads at each position (weights, text tensors, self-attention K/V),
    counted by the step itself for this prompt with classifier-free guidance."""
    step, held = guided_step(model, prompt, 1), model.prefix_positions(prompt)
    return {name: step.bytes_per_step(held + position) for name, position in positions.items()}


# ------------------------------------------------------------------------------------------ workers


def worker_load(args: dict) -> dict:
    """Cold load (conversion into an empty cache) then warm load (from that cache), one process."""
    import mlx.core as mx

    from musicgen import MusicGen

    dtype = getattr(mx, args["dtype"]) if args["dtype"] else None
    t = time.perf_counter()
    model = MusicGen.from_pretrained(
        args["model"], dtype=dtype, quantize=args["quantize"], progress=False
    )
    cold = time.perf_counter() - t
    del model
    t = time.perf_counter()
    MusicGen.from_pretrained(args["model"], dtype=dtype, quantize=args["quantize"], progress=False)
    warm = time.perf_counter() - t
    return {"cold_load_s": cold, "warm_load_s": warm, "max_rss_bytes": max_rss_bytes()}


def worker_generate(args: dict) -> dict:
    """Warm load, T5, the generations of args["steps"] (timed per step), EnCodec decode; then the roofline."""
    import mlx.core as mx

    from musicgen import MusicGen, _blas

    dtype = getattr(mx, args["dtype"]) if args["dtype"] else None
    t = time.perf_counter()
    model = MusicGen.from_pretrained(
        args["model"], dtype=dtype, quantize=args["quantize"], progress=False
    )
    load = time.perf_counter() - t
    if args.get("kv_dtype"):
        model.decoder.kv_dtype = getattr(mx, args["kv_dtype"])
    t5 = []
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(model.encode_text([args["prompt"]]))
        t5.append(time.perf_counter() - t)
    ids, _ = model.tokenizer.encode([args["prompt"]])
    mx.reset_peak_memory()
    runs = []
    for steps in args["steps"]:
        ends = []
        t0 = time.perf_counter()
        codes = model.generate_tokens(
            args["prompt"],
            steps,
            seed=args["seed"],
            progress=False,
            callback=lambda *_, ends=ends: ends.append(time.perf_counter()),
        )
        mx.eval(codes)
        t1 = time.perf_counter()
        audio = model.decode_tokens(codes)
        mx.eval(audio)
        t2 = time.perf_counter()
        runs.append(
            {
                "steps": steps,
                "samples": audio.shape[1],
                "wall_s": t2 - t0,
                "step_ends": [e - t0 for e in ends],
                "generate_s": t1 - t0,
                "decode_s": t2 - t1,
            }
        )
        del codes, audio
    rss = max_rss_bytes()
    peak = mx.get_peak_memory()
    bandwidth = matvec_bandwidth(args.get("matvec_size", 8192))
    positions = {name: (lo + hi) // 2 for name, (lo, hi) in WINDOWS.items()}
    reachable = {k: v for k, v in positions.items() if v + 16 < max(args["steps"])}
    paired = paired_roofline(model, args["prompt"], reachable, args.get("matvec_size", 8192))
    bytes_at = step_bytes(model, args["prompt"], positions)
    return {
        "versions": {"mlx": mx.__version__},
        "backend": backend(),
        "blas": _blas.describe(),
        "cpu_kernels": guided_step(model, args["prompt"], 8).on_kernels,
        "huge_pages": huge_pages.asked(),
        "blas_env": blas_env(),
        "dtype": str(model.decoder.dtype).removeprefix("mlx.core."),
        "kv_dtype": str(model.decoder.cache_dtype).removeprefix("mlx.core."),
        "quantize": args["quantize"],
        "load_s": load,
        "t5_s": median(t5),
        "input_ids": ids.tolist(),
        "runs": runs,
        "max_rss_bytes": rss,
        "mlx_peak_bytes": peak,
        "matvec_bytes_per_s": bandwidth,
        "step_bytes": bytes_at,
        "paired_roofline": paired,
        "sampling_rate": model.sampling_rate,
    }


def worker_main(worker: Callable[[dict], dict], args_json: str) -> None:
    """A worker process: its result as a `RESULT` line, or a bad model's error as an `ERROR` line."""
    from musicgen.weights import WeightsError

    try:
        result = worker(json.loads(args_json))
    except WeightsError as e:  # a missing, corrupt or unsupported checkpoint: the user's to fix
        print(f"ERROR {e}".splitlines()[0], flush=True)
        raise SystemExit(1) from None
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(kind: str, args: dict, env: dict) -> dict:
    """Run a worker in a fresh process of this interpreter; its result is the last `RESULT` line."""
    code = (
        "import sys; from apps import musicgen_bench as b; "
        f"b.worker_main(b.worker_{kind}, sys.argv[1])"
    )
    return _run([sys.executable, "-c", code, json.dumps(args)], env)


def run_transformers(python: str, args: dict) -> dict:
    runner = Path(__file__).with_name("transformers_runner.py")
    return _run([python, str(runner), json.dumps(args)], huge_pages.environment())


def _run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    if errors:
        raise SystemExit(f"musicgen-bench: {errors[-1][len('ERROR ') :]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"musicgen-bench: worker failed ({cmd[0]}, exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------ report


def summarize(result: dict, rate: int) -> dict:
    """Per-run step statistics and real-time factors (wall time / audio duration) from a raw result."""
    out = {k: v for k, v in result.items() if k != "runs"}
    out["runs"] = []
    for run in result["runs"]:
        audio_s = run["samples"] / rate
        summary = {k: v for k, v in run.items() if k != "step_ends"}
        summary.update(audio_s=audio_s, rtf=run["wall_s"] / audio_s, **step_stats(run["step_ends"]))
        out["runs"].append(summary)
    return out


def combine(results: list[dict]) -> dict:
    """Medians over repeats of every number (the first repeat's other fields)."""
    if len(results) == 1:
        return results[0]

    def merge(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, list) and first and isinstance(first[0], dict):
            return [merge([v[i] for v in values]) for i in range(len(first))]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            nums = [v for v in values if v is not None]
            return median(nums)
        return first

    return merge(results)


def roofline(ours: dict) -> dict:
    """Bound time per step (bytes / best matvec bandwidth) and the measured step's fraction of it."""
    bandwidth = max(ours["matvec_bytes_per_s"].values())
    main = ours["runs"][0]
    out = {"matvec_GBps": {k: v / 1e9 for k, v in ours["matvec_bytes_per_s"].items()}}
    for name, b in ours["step_bytes"].items():
        bound_ms = 1e3 * b["total"] / bandwidth
        measured = main.get(f"at_{name}_ms")
        out[name] = {
            "weights_MB": b["weights"] / 1e6,
            "kv_MB": b["kv"] / 1e6,
            "bound_ms": bound_ms,
            "measured_ms": measured,
            "fraction_of_bound": None if measured is None else bound_ms / measured,
        }
    out["paired"] = ours["paired_roofline"]
    return out


def flatness(report: dict) -> dict:
    """How much slower late steps (1400-1500) are than early ones (50-150): in the main run of each side,
    back to back (`paired_roofline`), and for the bound (the bytes a step reads, which grow with the K/V)."""
    late, early = FLATNESS

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    roof = report["roofline"]
    mains = {side: report[side]["runs"][0] for side in ("ours", "transformers") if side in report}
    out = {side: ratio(r[f"at_{late}_ms"], r[f"at_{early}_ms"]) for side, r in mains.items()}
    paired = roof["paired"]
    out["back_to_back"] = (
        ratio(paired[late]["step_ms"], paired[early]["step_ms"])
        if {late, early} <= paired.keys()
        else None
    )
    out["bound"] = ratio(roof[late]["bound_ms"], roof[early]["bound_ms"])
    return out


def fmt(x, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}{unit}"


def print_table(report: dict) -> None:
    ours, ref = report["ours"], report.get("transformers")
    rows = [
        ("cold load (convert + load)", report["load"]["cold_load_s"], None, " s", 2),
        ("warm load (conversion cache)", ours["load_s"], ref and ref["load_s"], " s", 2),
        ("T5 encode (1 prompt)", 1e3 * ours["t5_s"], ref and 1e3 * ref["t5_s"], " ms", 1),
    ]
    main, rmain = ours["runs"][0], ref and ref["runs"][0]
    rows.append(("decoder step, median", main["median_ms"], rmain and rmain["median_ms"], " ms", 1))
    for name in WINDOWS:
        rows.append(
            (
                f"decoder step at ~{name}",
                main[f"at_{name}_ms"],
                rmain and rmain[f"at_{name}_ms"],
                " ms",
                1,
            )
        )
    for i, run in enumerate(ours["runs"]):
        rrun = ref and ref["runs"][i]
        secs = run["audio_s"]
        rows.append(
            (f"EnCodec decode {secs:.0f} s", run["decode_s"], rrun and rrun["decode_s"], " s", 2)
        )
        rows.append(
            (f"end to end {secs:.0f} s (wall)", run["wall_s"], rrun and rrun["wall_s"], " s", 1)
        )
        rows.append((f"real-time factor {secs:.0f} s", run["rtf"], rrun and rrun["rtf"], "", 2))
    rows.append(
        ("peak RSS", ours["max_rss_bytes"] / 2**30, ref and ref["max_rss_bytes"] / 2**30, " GiB", 2)
    )
    rows.append(("MLX peak memory", ours["mlx_peak_bytes"] / 2**30, None, " GiB", 2))

    print(
        f"musicgen-bench: {report['model']}  ({report['machine']['cpu']}, {report['machine']['cores']} cores)"
    )
    print(
        f"backend {ours['backend']}, BLAS {ours['blas']}, dtype {ours['dtype']}"
        + (", fused CPU kernels" if ours.get("cpu_kernels") else "")
        + (", huge pages" if ours.get("huge_pages") else "")
        + (f", {ours['kv_dtype']} K/V cache" if ours.get("kv_dtype") != ours["dtype"] else "")
        + (f", {ours['quantize']}-bit decoder linears" if ours["quantize"] else "")
        + f", mlx {ours['versions']['mlx']}, batch 1, CFG 3, top-k 250, repeats {report['repeats']}"
    )
    if ours["blas_env"]:
        print("BLAS environment: " + ", ".join(f"{k}={v}" for k, v in ours["blas_env"].items()))
    if ref:
        v = ref["versions"]
        print(
            f"transformers {v['transformers']}, torch {v['torch']}, {ref['threads']} threads, float32"
        )
    width = max(len(r[0]) for r in rows) + 2
    head = f"{'':<{width}}{'ours':>12}" + (f"{'transformers':>14}{'ratio':>8}" if ref else "")
    print(head)
    for name, a, b, unit, digits in rows:
        line = f"{name:<{width}}{fmt(a, unit, digits):>12}"
        if ref:
            ratio = b / a if a and b else None
            line += f"{fmt(b, unit, digits):>14}{fmt(ratio, 'x', 2):>8}"
        print(line)
    if ref:
        print("ratio = transformers / ours (> 1: ours is faster or smaller)")
    roof = report["roofline"]
    bw = ", ".join(f"{k} {v:.1f} GB/s" for k, v in roof["matvec_GBps"].items())
    print(f"roofline: MLX float32 matvec {bw}")
    for name in WINDOWS:
        r = roof[name]
        print(
            f"  step ~{name}: reads {r['weights_MB']:.0f} MB weights + {r['kv_MB']:.0f} MB K/V -> "
            f"bound {r['bound_ms']:.1f} ms, measured {fmt(r['measured_ms'], ' ms')}, "
            f"{fmt(r['fraction_of_bound'] and 100 * r['fraction_of_bound'], '%', 0)} of the bound"
        )
    for name, r in roof["paired"].items():
        print(
            f"  back to back at ~{name}: step {r['step_ms']:.1f} ms, bound {r['bound_ms']:.1f} ms "
            f"(matvec {r['matvec_GBps']:.1f} GB/s next to it) -> "
            f"{100 * r['fraction_of_bound']:.0f}% of the bound"
        )
    flat = report["flatness"]
    late, early = (WINDOWS[name] for name in FLATNESS)
    print(
        f"flatness, median step {late[0]}-{late[1]} / {early[0]}-{early[1]}: ours {fmt(flat['ours'], 'x', 2)}"
        + (f", transformers {fmt(flat['transformers'], 'x', 2)}" if ref else "")
        + f", back to back {fmt(flat['back_to_back'], 'x', 2)}, bound {fmt(flat['bound'], 'x', 2)}"
    )


# ------------------------------------------------------------------------------------------ main


def bench_checkpoint(shape: str, root: Path | None = None) -> Path:
    """The random-weight checkpoint of `shape` in the bench cache, written on first use."""
    from apps.random_checkpoint import write_checkpoint
    from musicgen.weights import cache_root

    folder = (root or cache_root() / "bench") / shape
    done = folder / ".complete"
    if not done.exists():
        print(f"writing a random-weight {shape} checkpoint to {folder} (once)", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        write_checkpoint(shape, folder)
        done.write_text("ok\n")
    return folder


def share_kernels(cache: Path) -> None:
    """Our CPU kernels, built once in the user's cache, copied into the bench's own cache: a timed
    generation must not compile them (~8 s with g++, once per machine and version)."""
    from musicgen import cpu_kernels

    built = cpu_kernels.library()
    if built is not None:
        (cache / "kernels").mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, cache / "kernels" / built.name)


def run(args: argparse.Namespace) -> dict:
    """Every measurement; the report as a dict."""
    model = args.model or str(bench_checkpoint(args.shape))
    steps = [args.steps] + ([args.short_steps] if args.short_steps else [])
    common = {
        "model": model,
        "dtype": args.dtype,
        "kv_dtype": args.kv_dtype,
        "quantize": args.quantize,
        "prompt": args.prompt,
        "seed": args.seed,
        "matvec_size": args.matvec_size,
    }
    with tempfile.TemporaryDirectory(prefix="musicgen-bench-cache-") as cache:
        share_kernels(Path(cache))
        env = huge_pages.environment({**os.environ, "MUSICGEN_MLX_CACHE": cache})
        load = run_worker("load", common, env)
        ours_runs, ref_runs = [], []
        for _ in range(args.repeats):
            ours_runs.append(run_worker("generate", {**common, "steps": steps}, env))
            if args.compare_transformers:
                ref_args = {
                    "model": model,
                    "steps": steps,
                    "input_ids": ours_runs[-1]["input_ids"],
                    "seed": args.seed,
                }
                ref_runs.append(run_transformers(args.compare_transformers, ref_args))
    rate = ours_runs[0]["sampling_rate"]
    ours = combine([summarize(r, rate) for r in ours_runs])
    report = {
        "model": args.model or f"random-weight {args.shape} ({model})",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "steps": steps,
        "load": load,
        "ours": ours,
    }
    if ref_runs:
        report["transformers"] = combine([summarize(r, rate) for r in ref_runs])
    report["roofline"] = roofline(ours)
    report["flatness"] = flatness(report)
    return report


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model (a hub id or folder) or --shape (a random-weight checkpoint of a published shape)."""
    from apps.random_checkpoint import shapes

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a hub repo id or a local checkpoint folder")
    source.add_argument(
        "--shape",
        default="small",
        choices=shapes(),
        help="random-weight published shape (default small)",
    )


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_transformers(python: str) -> str | None:
    """Why `python` cannot run the transformers side (None if it can: torch and transformers import)."""
    try:
        proc = subprocess.run(
            [python, "-c", "import torch, transformers"], capture_output=True, text=True
        )
    except OSError as e:
        return e.strerror or str(e)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return f"it cannot import torch and transformers ({last})"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = Parser(
        prog="musicgen-bench", description=__doc__.split("\n\n")[0].removeprefix("musicgen-bench: ")
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--steps", type=int, default=1503, help="decoder steps of the main run (1503 = 30 s)"
    )
    parser.add_argument(
        "--short-steps", type=int, default=503, help="a second end-to-end run (503 = 10 s; 0: none)"
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="decoder dtype")
    parser.add_argument(
        "--kv-dtype",
        choices=["float32", "float16"],
        help="the self-attention K/V cache's dtype (default: the decoder's)",
    )
    parser.add_argument(
        "--quantize", type=int, choices=[4, 8], help="quantize the decoder's linears"
    )
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=1, help="generation runs (medians are reported)"
    )
    parser.add_argument(
        "--compare-transformers",
        metavar="PYTHON",
        help="an interpreter with torch + transformers: run their MusicGen too, alternated with ours",
    )
    parser.add_argument(
        "--matvec-size", type=int, default=8192, help="n of the n x n float32 roofline matvec"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.steps <= 3 or args.repeats < 1:
        parser.error("--steps must be > 3 and --repeats >= 1")
    if args.compare_transformers and (problem := check_transformers(args.compare_transformers)):
        parser.error(f"--compare-transformers {args.compare_transformers}: {problem}")
    try:
        report = run(args)
    except KeyboardInterrupt:  # the workers got the same Ctrl+C; the private cache is removed
        raise SystemExit(130) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
