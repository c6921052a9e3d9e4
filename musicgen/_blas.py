"""Load an optimized BLAS for MLX's CPU backend on Linux, before `mlx` is imported.

MLX's Linux CPU wheel bundles a reference BLAS (a few GFLOP/s). Loading a real BLAS with RTLD_GLOBAL before
`mlx.core` makes MLX's matrix products resolve to it. Which one, by MUSICGEN_MLX_BLAS:

- unset or `1` (auto): Intel MKL when the `mkl` wheel is installed (`uv sync --extra mkl`, Linux x86_64: its
  few-row products stream memory faster than OpenBLAS 0.3.21's packed path, 2-3x on an Intel Xeon); else
  Debian's OpenBLAS when installed; else MLX keeps its bundled BLAS. On a non-Intel CPU with AVX-512 (and no
  OPENBLAS_CORETYPE naming other kernels) OpenBLAS comes first: its AVX-512 small-matrix path makes the
  decoder step faster than MKL's there (an AMD EPYC VM, back to back: 54 / 62 / 72 against 56-58 / 70-71 /
  81-83 ms at positions 100 / 750 / 1450).
- `mkl` or `openblas`: that one only; a path: that file; `0`: none.

A warning (RuntimeWarning) when the chosen one is missing or does not load; MLX then keeps its bundled BLAS.

OpenBLAS's worker threads spin for about 2^28 cycles after each call before they sleep. The decoder's
attention runs on two MLX CPU streams between those calls, and a spinning worker takes a core from them (a
step at 1450 positions: 145 -> 120 ms on 2 cores), so OPENBLAS_THREAD_TIMEOUT defaults to 4 (spin 2^4 cycles)
unless it is already set. OpenBLAS picks its kernels for the CPU (`core`, e.g. Haswell for AVX2, Cooperlake
for AVX-512) unless OPENBLAS_CORETYPE names them. An AVX2 set named on an AVX-512 CPU lacks the AVX-512
small-matrix path (see small_product_limit) and runs the attention's small per-head products slower (24 layers
at 1450 positions: 45 against 27 ms): on an AMD EPYC VM a step's median of 30 s took 113 against 64 ms. MKL runs its
threads with Intel OpenMP (libiomp5, from the `intel-openmp` wheel next to it), else GNU OpenMP, else one
thread (MKL_THREADING_LAYER, unless already set).

Every package that imports mlx (`musicgen`, `t5`, `encodec`) calls load_blas() first in its __init__, so
`import t5` or `import encodec` alone gets it too. The first call decides; later calls return its result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import warnings
from pathlib import Path

OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

#: OpenBLAS worker spin before sleeping, as log2(cycles): short, so idle workers leave the cores to MLX's streams.
THREAD_TIMEOUT = "4"
#: OpenBLAS's cores (its names for its kernel sets) that run its AVX-512 float32 kernels.
AVX512_CORES = frozenset({"SkylakeX", "Cooperlake", "SapphireRapids"})

#: Path of the BLAS library loaded for MLX, or None (macOS, turned off, or none found).
loaded: str | None = None
#: "mkl", "openblas" or "other" (a library picked by path), None when none was loaded.
kind: str | None = None
#: The kernels OpenBLAS picked (its core name, e.g. "Haswell" or "SkylakeX"), None for other libraries.
core: str | None = None
# MUSICGEN_MLX_BLAS values that turn the loader off, and those that ask for the default pick
OFF_SETTINGS = ("0", "off", "false", "no")
DEFAULT_SETTINGS = ("", "1", "on", "true", "yes", "auto")
_tried = False  # load_blas ran once before mlx was imported: its answer stands


def mkl_paths() -> list[str]:
    """libmkl_rt from the `mkl` wheel, which pip and uv install into <environment>/lib."""
    prefixes = dict.fromkeys((sys.prefix, sys.base_prefix))
    return [
        str(p) for prefix in prefixes for p in sorted(Path(prefix, "lib").glob("libmkl_rt.so*"))
    ]


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def intel_cpu() -> bool:
    return "GenuineIntel" in _cpuinfo()


def avx512_cpu() -> bool:
    return " avx512f" in _cpuinfo()


def openblas_first() -> bool:
    """Whether the automatic pick tries OpenBLAS before MKL: where OpenBLAS will run its AVX-512 kernels
    (their small-matrix path, see small_product_limit) on a CPU where MKL is not at its best."""
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    named_ok = coretype is None or coretype.lower() in {c.lower() for c in AVX512_CORES}
    return avx512_cpu() and not intel_cpu() and named_ok


def kind_of(path: str) -> str:
    name = os.path.realpath(path).lower()
    return "mkl" if "mkl" in name else "openblas" if "openblas" in name else "other"


def candidates(setting: str) -> tuple[list[str], bool]:
    """The libraries to try for a MUSICGEN_MLX_BLAS value, and whether the user named them."""
    if os.path.sep in setting:
        return [setting], True
    if setting.lower() == "mkl":
        return mkl_paths() or ["libmkl_rt (the mkl wheel: uv sync --extra mkl)"], True
    if setting.lower() == "openblas":
        return [p for p in OPENBLAS if os.path.exists(p)] or ["Debian's OpenBLAS"], True
    if openblas_first():
        return list(OPENBLAS) + mkl_paths(), False
    return mkl_paths() + list(OPENBLAS), False


def openblas_core(library: ctypes.CDLL) -> str | None:
    try:
        name = library.openblas_get_corename
    except AttributeError:
        return None
    name.restype = ctypes.c_char_p
    return name().decode()


def _prepare_mkl(path: str) -> None:
    """MKL's threads: Intel OpenMP loaded globally when it sits next to MKL, else GNU OpenMP, else one."""
    iomp = Path(path).with_name("libiomp5.so")
    # loaded also when the user set MKL_THREADING_LAYER=INTEL: MKL does not load it itself
    if iomp.exists():
        ctypes.CDLL(str(iomp), mode=ctypes.RTLD_GLOBAL)
    elif "MKL_THREADING_LAYER" not in os.environ:
        os.environ["MKL_THREADING_LAYER"] = (
            "GNU" if ctypes.util.find_library("gomp") else "SEQUENTIAL"
        )


def load_blas() -> str | None:
    """Load a BLAS globally if on Linux, not disabled, and mlx is not imported yet; return its path."""
    global loaded, kind, core, _tried
    setting = os.environ.get("MUSICGEN_MLX_BLAS", "1").strip()
    if _tried or not sys.platform.startswith("linux") or setting.lower() in OFF_SETTINGS:
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already resolved its BLAS symbols
    _tried = True
    if os.path.sep not in setting and setting.lower() not in (*DEFAULT_SETTINGS, "mkl", "openblas"):
        warnings.warn(
            f"MUSICGEN_MLX_BLAS={setting}: not mkl, openblas, 0 or a library path; picking as by default",
            RuntimeWarning,
            stacklevel=2,
        )
    paths, chosen = candidates(setting)
    for path in paths:
        if not os.path.exists(path):
            if chosen:
                warnings.warn(
                    f"MUSICGEN_MLX_BLAS={setting}: no {path}; MLX keeps its bundled BLAS",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        try:
            if kind_of(path) == "mkl":
                _prepare_mkl(path)
            os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)  # read when it loads
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            if chosen:
                warnings.warn(
                    f"MUSICGEN_MLX_BLAS={setting}: cannot load {path} ({e}); MLX keeps its bundled BLAS",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        loaded, kind, core = path, kind_of(path), openblas_core(library)
        break
    return loaded


def weight_first() -> bool:
    """Whether a product of a few rows runs faster as W @ x^T than as x @ W^T.

    Yes with OpenBLAS's AVX2 kernels (its column-major matrix-vector form, 5-20 % faster for 2 rows),
    not with its AVX-512 kernels on an AMD CPU (which it picks on a Zen 4: there x @ W^T gives a step at
    100 / 1450 positions of 79-82 / 98-105 ms against 82-83 / 103-105 ms); yes with MKL on other CPUs
    than Intel's (an AMD EPYC step at ~100 positions: 64 vs 92-101 ms; x @ W^T streams a 1024 x 4096
    weight at half the rate there); no with MKL on an Intel CPU (W @ x^T: 112 vs 70 ms).
    """
    if kind == "openblas":
        return core not in AVX512_CORES or intel_cpu()
    return kind == "mkl" and not intel_cpu()


# OpenBLAS's AVX-512 kernels run a float32 product of M x N x K <= 1e6 with their small-matrix code,
# which skips packing the weight (OpenBLAS 0.3.21, `sgemm_small_kernel_permit` for SkylakeX).
SMALL_PRODUCT = 1_000_000


def small_product_limit() -> int | None:
    """The M x N x K up to which the BLAS takes its small-matrix path, when a step should split its
    few-row products into such pieces; None otherwise.

    With OpenBLAS's AVX-512 kernels on the AMD EPYC VM, 2-row products with the 24 layers' weights
    stream at 28 GB/s split so (1024-wide inputs: 488 weight rows a piece, 4096-wide: 122) against
    19-20 GB/s whole; one piece more (2 x 512 x 1024) falls back to the packed path, at 18 GB/s.
    Only where the step runs x @ W^T (see weight_first).
    """
    if kind == "openblas" and core in AVX512_CORES and not weight_first():
        return SMALL_PRODUCT
    return None


def describe() -> str:
    """One line naming the BLAS MLX uses on this machine."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    names = {"mkl": "Intel MKL", "openblas": "OpenBLAS", "other": "BLAS"}
    if not loaded:
        return "MLX bundled reference BLAS"
    kernels = f", {core} kernels" if core else ""
    if core and os.environ.get("OPENBLAS_CORETYPE"):
        kernels += " (OPENBLAS_CORETYPE)"  # named by the user, not picked for the CPU
    return f"{names[kind]}{kernels} ({loaded})"
