"""The style gates run with the tests, so they cannot drift: ruff (lint and format), mypy on
the Python packages, clang-format on csrc/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY_PATHS = ["llumnix_kv", "llumnix", "tests", "benchmarks"]


def run(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_lint() -> None:
    run(sys.executable, "-m", "ruff", "check", *PY_PATHS)


def test_ruff_format() -> None:
    run(sys.executable, "-m", "ruff", "format", "--check", *PY_PATHS)


def test_mypy() -> None:
    run(sys.executable, "-m", "mypy")


def test_clang_format() -> None:
    exe = shutil.which("clang-format")
    if exe is None:
        pytest.fail("clang-format is not installed (pip install clang-format)")
    sources = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in {".h", ".cc", ".cu", ".cuh"}
    )
    run(exe, "--dry-run", "--Werror", *sources)
