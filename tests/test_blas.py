"""The OpenBLAS loader (musicgen/_blas.py), in fresh interpreters: `import t5` / `import encodec` alone load
it before mlx, MUSICGEN_MLX_BLAS=0 turns it off, a path picks the library, a bad path warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_OPENBLAS = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
            "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
        )
        if os.path.exists(p)
    ),
    None,
)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux loader only")

# Import one package alone, then report what the loader did and which libraries the process mapped.
PROBE = """
import json, os, sys
import {package}
from musicgen import _blas
import mlx.core as mx
assert (mx.ones((4, 4)) @ mx.ones((4, 4))).sum().item() == 64
maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
print(json.dumps({{"loaded": _blas.loaded, "maps": maps, "timeout": timeout}}))
"""


def probe(package: str, setting: str | None, **extra: str) -> tuple[dict, str]:
    drop = ("MUSICGEN_MLX_BLAS", "OPENBLAS_THREAD_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in drop} | extra
    if setting is not None:
        env["MUSICGEN_MLX_BLAS"] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@linux_only
@pytest.mark.parametrize("package", ["t5", "encodec", "musicgen"])
def test_turned_off_loads_nothing(package):
    result, err = probe(package, "0")
    assert result["loaded"] is None
    assert "openblas" not in result["maps"].lower()
    assert "MUSICGEN_MLX_BLAS" not in err


@linux_only
@pytest.mark.skipif(
    DEBIAN_OPENBLAS is None, reason="Debian's libopenblas0-pthread is not installed"
)
@pytest.mark.parametrize("package", ["t5", "encodec"])
@pytest.mark.parametrize("setting", [None, "path"])
def test_each_package_alone_loads_openblas_before_mlx(package, setting):
    result, err = probe(package, DEBIAN_OPENBLAS if setting == "path" else setting)
    assert result["loaded"] == DEBIAN_OPENBLAS
    assert os.path.realpath(DEBIAN_OPENBLAS) in result["maps"]
    assert "MUSICGEN_MLX_BLAS" not in err


@linux_only
@pytest.mark.parametrize("package", ["t5", "encodec"])
def test_a_path_that_does_not_exist_warns(package, tmp_path):
    missing = str(tmp_path / "no-such-libblas.so")
    result, err = probe(package, missing)
    assert result["loaded"] is None
    lines = [line for line in err.splitlines() if "MUSICGEN_MLX_BLAS" in line]
    assert len(lines) == 1 and missing in lines[0] and "RuntimeWarning" in lines[0]
    assert "openblas" not in result["maps"].lower()


@linux_only
def test_a_file_that_is_not_a_library_warns(tmp_path):
    bogus = tmp_path / "libblas.so"
    bogus.write_text("not a shared object")
    result, err = probe("t5", str(bogus))
    assert result["loaded"] is None
    assert "cannot load" in err and str(bogus) in err


@linux_only
@pytest.mark.skipif(
    DEBIAN_OPENBLAS is None, reason="Debian's libopenblas0-pthread is not installed"
)
def test_openblas_workers_spin_briefly_unless_told_otherwise():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it loads: short by default, the user's value kept."""
    result, _ = probe("musicgen", None)
    assert result["loaded"] == DEBIAN_OPENBLAS and result["timeout"] == "4"
    result, _ = probe("musicgen", None, OPENBLAS_THREAD_TIMEOUT="20")
    assert result["timeout"] == "20"
    result, _ = probe("musicgen", "0")
    assert result["loaded"] is None and result["timeout"] is None
