"""vitrine.compute: how local Dask workers start."""

from __future__ import annotations

import sys
import types

import pytest

from vitrine.compute import start_method


def test_local_workers_fork_unless_onnx_runtime_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    assert start_method() == "fork"  # a stage's process: fast starts, nothing to copy half-taken
    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    assert start_method() == "spawn"  # its sessions' locks would hang a forked worker
