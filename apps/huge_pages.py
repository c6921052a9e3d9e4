"""Transparent huge pages for the buffers MLX allocates (Linux with glibc).

A generation step streams ~1.3 GB of decoder weights plus the K/V cache. In 4 KiB pages that is a TLB
miss every 64 cache lines; in 2 MiB pages the step on the fused CPU kernels ran 8-10 % faster on the
2-core AMD EPYC VM (musicgen-small, at ~100 / ~750 / ~1450 positions 31.7-33.9 / 35.1-37.3 /
38.8-40.9 ms against 34.5-37.0 / 39.3-40.9 / 43.3-44.4; docs/benchmarks.md). Where the kernel gives
huge pages only to memory that asks for them (transparent_hugepage "madvise", the default of several
distributions), glibc's malloc asks with its tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35). A
tunable is read when a process starts, so `musicgen-cli` runs itself again with it, and
`musicgen-bench` starts its workers with it (transformers' too, so both sides get the same memory).

MUSICGEN_MLX_HUGE_PAGES=0 turns this off. With the Python API, start Python with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the same effect.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODES = ("always", "madvise", "never")
OFF_SETTINGS = ("0", "off", "false", "no")


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether processes started with `env` should ask malloc for huge pages: Linux, glibc >= 2.35,
    huge pages on request only, and not turned off."""
    if env.get("MUSICGEN_MLX_HUGE_PAGES", "").strip().lower() in OFF_SETTINGS:
        return False
    return sys.platform == "linux" and thp_mode() == "madvise" and _glibc_has_tunable()


def asked(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `env` (by default this process's) sets glibc's huge page tunable (to any value)."""
    return any(t.split("=")[0] == TUNABLE for t in env.get("GLIBC_TUNABLES", "").split(":"))


def environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES where wanted and not set."""
    out = dict(env)
    if wanted(env) and not asked(env):
        out["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    return out


def run_again_with_huge_pages() -> None:
    """Replace this process by itself started with the tunable, where wanted and not yet set (the
    same PID, arguments and working folder; only the environment differs)."""
    env = environment()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES") or not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):  # None when the stream was closed (`>&-`)
        if stream is not None:
            stream.flush()
    with contextlib.suppress(OSError):  # cannot start again (an embedded interpreter): go on as is
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
