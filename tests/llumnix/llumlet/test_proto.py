"""The checked-in gRPC modules are what grpc_tools makes of llumlet.proto now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

REPO = Path(__file__).resolve().parents[3]
PROTO = Path("llumnix/llumlet/llumlet.proto")
GENERATED = ("llumlet_pb2.py", "llumlet_pb2.pyi", "llumlet_pb2_grpc.py")


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", str(PROTO)],
        cwd=tmp_path, check=True, timeout=60,
    )  # fmt: skip
    for name in GENERATED:
        want = (tmp_path / PROTO.parent / name).read_text()
        have = (REPO / PROTO.parent / name).read_text()
        assert have == want, f"{name} is stale: regenerate it (see the top of {PROTO})"
