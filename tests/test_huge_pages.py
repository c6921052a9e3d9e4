"""apps/huge_pages.py: glibc's huge page tunable for the CLI's and the bench's processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apps import huge_pages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def thp(tmp_path, monkeypatch):
    """Sets the kernel's transparent huge page mode huge_pages reads (a file like sysfs's)."""
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    monkeypatch.setattr(huge_pages, "_glibc_has_tunable", lambda: True)

    def set_mode(mode: str) -> None:
        setting.write_text(" ".join(f"[{m}]" if m == mode else m for m in huge_pages.MODES) + "\n")

    return set_mode


def test_the_kernels_mode_is_read_from_sysfs(thp):
    for mode in ("always", "madvise", "never"):
        thp(mode)
        assert huge_pages.thp_mode() == mode
    huge_pages.THP_SETTING.unlink()
    assert huge_pages.thp_mode() is None


def test_the_tunable_is_added_where_huge_pages_come_on_request_only(thp):
    thp("madvise")
    assert huge_pages.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    kept = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert kept == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    # the user's own setting of the tunable, any value, stays as it is
    own = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert huge_pages.asked(own) and huge_pages.environment(own) == own
    assert huge_pages.environment({"MUSICGEN_MLX_HUGE_PAGES": "0"}) == {
        "MUSICGEN_MLX_HUGE_PAGES": "0"
    }
    for mode in ("always", "never"):  # huge pages anyway, or none at all: nothing to ask
        thp(mode)
        assert not huge_pages.wanted() and huge_pages.environment({"A": "b"}) == {"A": "b"}


def test_a_process_runs_itself_again_with_the_tunable(tmp_path):
    """The same PID, arguments and working folder, the tunable added (on this machine where the
    kernel's mode asks for it; elsewhere the process goes on unchanged)."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "from apps import huge_pages\n"
        "print(os.getpid(), flush=True)\n"
        "huge_pages.run_again_with_huge_pages()\n"
        "print(json.dumps([os.getpid(), sys.argv[1:], os.getcwd(), os.environ.get('GLIBC_TUNABLES')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",)}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, str(script), "a b", "-c"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = r.stdout.splitlines()
    pid, argv, cwd, tunables = json.loads(lines[-1])
    assert pid == int(lines[0]) and argv == ["a b", "-c"] and cwd == str(tmp_path)
    if huge_pages.wanted(env):
        assert len(lines) == 3 and tunables == "glibc.malloc.hugetlb=1"  # printed before and after
    else:
        assert len(lines) == 2 and tunables is None


def test_a_process_that_cannot_start_again_goes_on(thp, monkeypatch):
    """execve failing (an embedded interpreter, a vanished executable) leaves the process as it was."""
    thp("madvise")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    calls = []

    def failing_execve(path, argv, env):
        calls.append(env["GLIBC_TUNABLES"])
        raise OSError("no such file")

    monkeypatch.setattr(huge_pages.os, "execve", failing_execve)
    huge_pages.run_again_with_huge_pages()
    assert calls == ["glibc.malloc.hugetlb=1"] and "GLIBC_TUNABLES" not in os.environ
