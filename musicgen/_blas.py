"""Load an optimized BLAS for MLX's CPU backend on Linux, before `mlx` is imported.

MLX's Linux CPU wheel bundles a reference BLAS (a few GFLOP/s). When Debian's OpenBLAS is installed, loading it
with RTLD_GLOBAL before `mlx.core` makes MLX's matrix products resolve to it (about 25x faster on a 2-core x86
machine). Set MUSICGEN_MLX_BLAS=0 to turn this off, or MUSICGEN_MLX_BLAS=/path/to/libblas.so to pick a library
(a RuntimeWarning when that path does not exist or does not load; MLX then keeps its bundled BLAS).

OpenBLAS's worker threads spin for about 2^28 cycles after each call before they sleep. The decoder's
attention runs on two MLX CPU streams between those calls, and a spinning worker takes a core from them (a
step at 1450 positions: 145 -> 120 ms on 2 cores), so OPENBLAS_THREAD_TIMEOUT defaults to 4 (spin 2^4 cycles)
unless it is already set.

Every package that imports mlx (`musicgen`, `t5`, `encodec`) calls load_blas() first in its __init__, so
`import t5` or `import encodec` alone gets OpenBLAS too. The first call decides; later calls return its result.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

#: OpenBLAS worker spin before sleeping, as log2(cycles): short, so idle workers leave the cores to MLX's streams.
THREAD_TIMEOUT = "4"

#: Path of the BLAS library loaded for MLX, or None (macOS, turned off, or none found).
loaded: str | None = None
_tried = False  # load_blas ran once before mlx was imported: its answer stands


def load_blas() -> str | None:
    """Load OpenBLAS globally if on Linux, not disabled, and mlx is not imported yet; return its path."""
    global loaded, _tried
    setting = os.environ.get("MUSICGEN_MLX_BLAS", "1").strip()
    if (
        _tried
        or not sys.platform.startswith("linux")
        or setting.lower() in ("0", "off", "false", "no")
    ):
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already resolved its BLAS symbols
    _tried = True
    chosen = os.path.sep in setting
    paths = (setting,) if chosen else CANDIDATES
    for path in paths:
        if not os.path.exists(path):
            if chosen:
                warnings.warn(
                    f"MUSICGEN_MLX_BLAS={path}: no such file; MLX keeps its bundled BLAS",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)  # read when it loads
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            if chosen:
                warnings.warn(
                    f"MUSICGEN_MLX_BLAS={path}: cannot load it ({e}); MLX keeps its bundled BLAS",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        loaded = path
        break
    return loaded


def describe() -> str:
    """One line naming the BLAS MLX uses on this machine."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"OpenBLAS ({loaded})" if loaded else "MLX bundled reference BLAS"
