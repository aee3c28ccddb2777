"""dtype "auto" per device: fp32 on a CPU, bf16 on a GPU that computes in it, fp16 on one that
does not (a T4), and the choice is said to the user with its reason.

No GPU here: the one thing replaced is the capability query, ``torch.cuda.get_device_capability``.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from runtime.models import choose_dtype, resolve_dtype


def gpu_reporting(monkeypatch, major: int, minor: int) -> torch.device:
    """A CUDA device of compute capability ``major.minor`` (T4: 7.5, A100: 8.0, H100: 9.0)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return torch.device("cuda")


def test_auto_is_fp16_on_a_gpu_without_bf16(monkeypatch):
    dtype, why = choose_dtype("auto", gpu_reporting(monkeypatch, 7, 5))
    assert dtype is torch.float16
    assert why == "auto: float16, this GPU has no native bfloat16 (T4, V100: compute capability < 8)"


@pytest.mark.parametrize("major", [8, 9, 10])
def test_auto_is_bf16_on_a_gpu_that_computes_in_it(monkeypatch, major):
    dtype, why = choose_dtype("auto", gpu_reporting(monkeypatch, major, 0))
    assert dtype is torch.bfloat16 and why == "auto: bfloat16, which this GPU computes in"


def test_auto_is_fp32_on_a_cpu_and_a_named_dtype_is_kept(monkeypatch):
    assert choose_dtype("auto", torch.device("cpu"))[0] is torch.float32
    t4 = gpu_reporting(monkeypatch, 7, 5)
    assert choose_dtype("bf16", t4) == (torch.bfloat16, "as asked")  # the user's word wins
    assert resolve_dtype("float32", t4) is torch.float32


@pytest.mark.model
def test_the_cli_memory_plan_says_which_dtype_and_why(smollm2):
    from cli import flags
    from prune.recipe import Recipe

    lines = []
    bar = SimpleNamespace(message=lines.append)
    recipe = Recipe(model="smollm2-135m-instruct", device="cpu")
    flags.show_memory_plan(argparse.Namespace(max_memory=None, streaming="auto"), recipe, bar)
    assert lines[0].splitlines()[-1] == (
        "  dtype: float32 (auto: float32 on a CPU (bf16 matmuls are several times slower there))"
    )


@pytest.mark.model
def test_the_loaded_model_says_its_dtype_and_why(smollm2_lab):
    info = smollm2_lab.model_info()
    assert info["dtype"] == "float32"
    assert info["dtype_reason"] == "auto: float32 on a CPU (bf16 matmuls are several times slower there)"
