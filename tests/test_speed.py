"""Measured 2:4: what runs without a GPU (the capability check, the pattern check, the bench's and
the app's message). The GPU path itself is in tests/test_gpu.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import speed

ROOT = Path(__file__).resolve().parents[1]


def test_capability_check():
    ok, why = speed.semi_structured_support(available=False)
    assert not ok and "compute capability >= 8.0" in why and "none" in why
    ok, why = speed.semi_structured_support(available=True, capability=(7, 5))
    assert not ok and "7.5" in why
    for capability in [(8, 0), (8, 6), (9, 0)]:
        ok, why = speed.semi_structured_support(available=True, capability=capability)
        assert ok and f"{capability[0]}.{capability[1]}" in why


def test_capability_check_reads_torch_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speed.semi_structured_support() == speed.semi_structured_support(available=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not speed.semi_structured_support()[0]


def test_the_24_pattern_check():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert speed.is_24(weight)
    assert not speed.is_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert not speed.is_24(torch.zeros(2, 6))  # columns not a multiple of 4


def test_measure_refuses_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(speed.SpeedError, match="compute capability >= 8.0"):
        speed.measure_24(torch.nn.Linear(4, 4), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
def test_bench_says_it_needs_a_gpu_and_exits_0():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_24.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs an NVIDIA GPU with compute capability >= 8.0" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
def test_the_app_says_24_speed_is_not_available_here():
    from ui.lab_tab import speed_note

    assert speed_note("unstructured").visible is False
    note = speed_note("2:4")
    assert note.visible is True and "2:4 speed measurement is not available here" in note.value
