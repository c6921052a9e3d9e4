"""The decoder step's fused CPU kernels (csrc/cpu_kernels.cpp), compiled on first use.

On an x86-64 Linux CPU with AVX-512, the generation step (1 to MAX_ROWS = 8 rows: classifier-free
guidance's pair for one to four prompts) runs each decoder layer as two MLX C++ primitives around its cache write
instead of about 25 of MLX's operations, and its LM heads and final layer norm on the same products:
each weight is read once for all rows, the self-attention is one pass per head (both split over two
cores inside the primitive), and a layer norm is one operation instead of five (see
docs/benchmarks.md). A quantized decoder (8 or 4 bits, groups of 64) runs on the same
layer kernels with its quantized weights, and its other products as `quantized_product`, about 20 times
faster than MLX's CPU `quantized_matmul`.

The extension is compiled once with the system C++ compiler (`$CXX`, else g++: MLX's CPU backend
compiles its fused kernels with it too) against the installed MLX and nanobind (the version MLX was
built with), into the conversion cache (`$MUSICGEN_MLX_CACHE/kernels`), and checked against MLX
before use. Anything missing or failing means MLX's own operations, with one logged warning.

MUSICGEN_MLX_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from musicgen import _blas

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
MAX_ROWS = 8  # the rows a step may have on the kernels (csrc/cpu_kernels.cpp's MAX_ROWS)


def wanted() -> bool:
    """Whether this machine can run the kernels and they were not turned off."""
    if os.environ.get("MUSICGEN_MLX_KERNELS", "").strip().lower() in _blas.OFF_SETTINGS:
        return False
    return sys.platform == "linux" and platform.machine() == "x86_64" and _blas.avx512_cpu()


def library() -> Path | None:
    """The compiled library in the conversion cache (building it the first time), or None where the
    kernels cannot run or do not build."""
    if not wanted():
        return None
    try:
        return _build()
    except Exception as e:  # no compiler, no nanobind
        logger.warning("musicgen CPU kernels unavailable (%s); using MLX's operations", e)
        return None


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (building them the first time), or None where they cannot run."""
    path = library()
    if path is None:
        return None
    try:
        module = _import(path)
        _check(module)
    except Exception as e:  # no compiler, no nanobind, an MLX it does not match: MLX's own ops
        logger.warning("musicgen CPU kernels unavailable (%s); using MLX's operations", e)
        return None
    return module


def enabled() -> bool:
    """Whether the kernels are in use (loaded on the first call)."""
    return load() is not None


def _nanobind():
    import nanobind

    return nanobind


def _cpu_id() -> str:
    """The CPU's model and feature flags: the library is built with -march=native, so a cache shared
    between machines (a network home) must not hand one CPU's build to another."""
    lines = _blas._cpuinfo().splitlines()
    return "|".join(
        next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags")
    )


def _library_path() -> Path:
    """Where the compiled module lives: named by the source, MLX, nanobind, Python, the compiler and
    the CPU."""
    from musicgen.weights import cache_root

    nanobind = _nanobind()
    key = "|".join(
        [
            hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
            mx.__version__,
            nanobind.__version__,
            sys.version,
            _compiler(),
            platform.machine(),
            _cpu_id(),
        ]
    )
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return cache_root() / "kernels" / f"_cpu_kernels-{tag}{suffix}"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _build() -> Path:
    """Compiles the extension unless already built; returns its path."""
    target = _library_path()
    if target.exists():
        return target
    failed = target.with_name(target.name + ".failed")
    if failed.exists():  # the same source and toolchain failed before: do not pay for it each run
        raise RuntimeError(f"{failed.read_text().strip()} (earlier; delete {failed} to try again)")
    compiler = shutil.which(_compiler())
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({_compiler()}; set CXX)")
    nanobind = Path(_nanobind().__file__).parent
    mlx_root = Path(mx.__file__).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            compiler,
            "-std=c++20",
            "-O3",
            "-march=native",
            "-fPIC",
            "-shared",
            "-fvisibility=hidden",
            "-fno-strict-aliasing",
            "-DNDEBUG",
            "-DNB_DOMAIN=mlx",  # share MLX's nanobind types (mx.array)
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{nanobind / 'include'}",
            f"-I{nanobind / 'ext' / 'robin_map' / 'include'}",
            f"-I{mlx_root / 'include'}",
            str(SOURCE),
            str(nanobind / "src" / "nb_combined.cpp"),
            "-o",
            str(built),
            f"-L{mlx_root / 'lib'}",
            "-lmlx",
            f"-Wl,-rpath,{mlx_root / 'lib'}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            failed.write_text(f"compiling {SOURCE.name} failed: {last}\n")
            raise RuntimeError(f"compiling {SOURCE.name} failed: {last}")
        os.replace(built, target)  # whole or not at all, also with another process building
    return target


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_cpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(module: ModuleType) -> None:
    """The kernels against MLX on small inputs: an ABI mismatch shows up here, not mid-generation."""
    with mx.stream(mx.cpu):
        key = mx.random.key(0)
        x, w = mx.random.normal((2, 40), key=key), mx.random.normal((37, 40), key=key)
        square = w[:, :37]
        normed = mx.fast.layer_norm(x, w[0], w[1], 1e-5)
        qkv = module.attention_inputs(
            x[:, :37], w[0, :37], w[1, :37], square, square, square, 0.5, 1e-5
        )
        expected = mx.fast.layer_norm(x[:, :37], w[0, :37], w[1, :37], 1e-5) @ square.T
        if not (
            mx.allclose(module.few_row_product(x, w), x @ w.T, atol=1e-4).item()
            and mx.allclose(module.layer_norm(x, w[0], w[1], 1e-5), normed, atol=1e-5).item()
            and mx.allclose(qkv, mx.stack([expected * 0.5, expected, expected]), atol=1e-4).item()
            and mx.allclose(module.elu(x), mx.where(x > 0, x, mx.expm1(x)), atol=1e-6).item()
        ):
            raise RuntimeError("results differ from MLX's")
