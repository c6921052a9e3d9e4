"""The OpenBLAS loader (musicgen/_blas.py), in fresh interpreters: `import t5` / `import encodec` alone load
it before mlx, MUSICGEN_MLX_BLAS=0 turns it off, a path picks the library, a bad path warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musicgen import _blas

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
MKL = next(iter(_blas.mkl_paths()), None)
# what MUSICGEN_MLX_BLAS unset picks (OPENBLAS_CORETYPE unset, as in `probe`): MKL when the mkl wheel is
# installed, else Debian's OpenBLAS; OpenBLAS first on a non-Intel AVX-512 CPU
AUTO = (
    (DEBIAN_OPENBLAS or MKL)
    if _blas.avx512_cpu() and not _blas.intel_cpu()
    else (MKL or DEBIAN_OPENBLAS)
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
print(json.dumps({{"loaded": _blas.loaded, "kind": _blas.kind, "core": _blas.core,
                  "describe": _blas.describe(), "maps": maps, "timeout": timeout}}))
"""


def probe(package: str, setting: str | None, **extra: str) -> tuple[dict, str]:
    drop = (
        "MUSICGEN_MLX_BLAS",
        "OPENBLAS_THREAD_TIMEOUT",
        "OPENBLAS_CORETYPE",
        "MKL_THREADING_LAYER",
    )
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
@pytest.mark.parametrize("setting", ["openblas", "path"])
def test_each_package_alone_loads_openblas_before_mlx(package, setting):
    result, err = probe(package, DEBIAN_OPENBLAS if setting == "path" else setting)
    assert result["loaded"] == DEBIAN_OPENBLAS and result["kind"] == "openblas"
    assert os.path.realpath(DEBIAN_OPENBLAS) in result["maps"]
    assert "MUSICGEN_MLX_BLAS" not in err


@linux_only
@pytest.mark.skipif(AUTO is None, reason="neither MKL nor Debian's OpenBLAS is installed")
@pytest.mark.parametrize("package", ["t5", "encodec", "musicgen"])
def test_by_default_mkl_when_installed_else_openblas(package):
    result, err = probe(package, None)
    assert result["loaded"] == AUTO
    assert os.path.realpath(AUTO) in result["maps"]
    assert result["kind"] == ("mkl" if AUTO == MKL else "openblas")
    assert "MUSICGEN_MLX_BLAS" not in err


@linux_only
@pytest.mark.skipif(MKL is None, reason="the mkl wheel is not installed (uv sync --extra mkl)")
def test_mkl_when_asked_with_intel_openmp_for_its_threads():
    result, err = probe("musicgen", "mkl")
    assert result["loaded"] == MKL and result["kind"] == "mkl"
    assert os.path.realpath(MKL) in result["maps"]
    assert "libiomp5.so" in result["maps"]  # loaded first: MKL's default threading layer needs it
    assert "MUSICGEN_MLX_BLAS" not in err


@pytest.mark.parametrize(
    "setting, expected",
    [("/x/libblas.so", ["/x/libblas.so"]), ("openblas", None), ("mkl", None), ("1", None)],
)
def test_candidates_follow_the_setting(setting, expected):
    paths, chosen = _blas.candidates(setting)
    assert chosen == (setting != "1")
    if expected is not None:
        assert paths == expected
    elif setting == "openblas":
        assert paths == [p for p in _blas.OPENBLAS if os.path.exists(p)] or len(paths) == 1
    elif setting == "mkl":
        assert paths == (_blas.mkl_paths() or paths) and len(paths) >= 1
    elif _blas.openblas_first():
        assert paths == list(_blas.OPENBLAS) + _blas.mkl_paths()
    else:
        assert paths == _blas.mkl_paths() + list(_blas.OPENBLAS)


def test_openblas_first_where_its_avx512_kernels_run(monkeypatch):
    # (AVX-512 CPU, Intel CPU, OPENBLAS_CORETYPE, OpenBLAS before MKL?)
    cases = [
        (True, False, None, True),
        (True, False, "Cooperlake", True),
        (True, False, "skylakex", True),
        (True, False, "Haswell", False),  # AVX2 kernels named: MKL is faster
        (True, True, None, False),  # Intel: MKL's x @ W^T is at its best there
        (False, False, None, False),
    ]
    for avx512, intel, coretype, first in cases:
        monkeypatch.setattr(_blas, "avx512_cpu", lambda avx512=avx512: avx512)
        monkeypatch.setattr(_blas, "intel_cpu", lambda intel=intel: intel)
        if coretype is None:
            monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
        else:
            monkeypatch.setenv("OPENBLAS_CORETYPE", coretype)
        assert _blas.openblas_first() is first, (avx512, intel, coretype)
        paths, chosen = _blas.candidates("1")
        openblas_at = paths.index(_blas.OPENBLAS[0])
        assert not chosen and openblas_at == (0 if first else len(_blas.mkl_paths()))


def test_kind_and_product_form_follow_the_library(monkeypatch):
    assert _blas.kind_of("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3") == "openblas"
    assert _blas.kind_of("/venv/lib/libmkl_rt.so.3") == "mkl"
    assert _blas.kind_of("/opt/lib/libblis.so.4") == "other"
    # (kind, OpenBLAS core, Intel CPU, W @ x^T?)
    cases = [("other", None, False, False), (None, None, False, False)]
    # OpenBLAS: W @ x^T, except x @ W^T with its AVX-512 kernels on an AMD CPU
    cases += [("openblas", "Haswell", False, True), ("openblas", "Haswell", True, True)]
    cases += [("openblas", "Cooperlake", False, False), ("openblas", "SkylakeX", False, False)]
    cases += [("openblas", "SkylakeX", True, True), ("openblas", None, False, True)]
    # MKL: x @ W^T on an Intel CPU, W @ x^T on others
    cases += [("mkl", None, True, False), ("mkl", None, False, True)]
    for kind, core, intel, weight_first in cases:
        monkeypatch.setattr(_blas, "kind", kind)
        monkeypatch.setattr(_blas, "core", core)
        monkeypatch.setattr(_blas, "intel_cpu", lambda intel=intel: intel)
        assert _blas.weight_first() is weight_first


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
def test_an_unknown_setting_warns_and_picks_as_by_default():
    result, err = probe("t5", "bogus")
    assert result["loaded"] == AUTO
    lines = [line for line in err.splitlines() if "MUSICGEN_MLX_BLAS" in line]
    assert len(lines) == 1 and "MUSICGEN_MLX_BLAS=bogus: not mkl, openblas, 0" in lines[0]


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
    result, _ = probe("musicgen", "openblas")
    assert result["loaded"] == DEBIAN_OPENBLAS and result["timeout"] == "4"
    result, _ = probe("musicgen", "openblas", OPENBLAS_THREAD_TIMEOUT="20")
    assert result["timeout"] == "20"
    result, _ = probe("musicgen", "0")
    assert result["loaded"] is None and result["timeout"] is None


@linux_only
@pytest.mark.skipif(
    DEBIAN_OPENBLAS is None or "x86_64" not in DEBIAN_OPENBLAS,
    reason="Debian's x86_64 libopenblas0-pthread is not installed",
)
def test_the_kernels_openblas_runs_are_reported():
    """The loader asks OpenBLAS which kernels it picked: OPENBLAS_CORETYPE's when set, else its own."""
    for named in ("Sandybridge", "Haswell"):
        result, _ = probe("musicgen", "openblas", OPENBLAS_CORETYPE=named)
        assert result["core"] == named
        expected = f"OpenBLAS, {named} kernels (OPENBLAS_CORETYPE) ({DEBIAN_OPENBLAS})"
        assert result["describe"] == expected
    result, _ = probe("musicgen", "openblas")
    assert isinstance(result["core"], str) and result["core"]  # OpenBLAS's pick for this CPU
    assert result["describe"] == f"OpenBLAS, {result['core']} kernels ({DEBIAN_OPENBLAS})"
    result, _ = probe("musicgen", "0")
    assert result["core"] is None and result["describe"] == "MLX bundled reference BLAS"
