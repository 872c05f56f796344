"""bench/gpu.py: the smoke run (CPU, tiny preset) prints its table and ratios and writes finite positive
numbers; on a CUDA box the real mode runs too (few steps, one timed run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"

NUMBERS = (
    "default_chunk_s", "default_chunk_flops", "fast_chunk_s", "fast_chunk_flops", "chunk2_s", "chunk10_s",
    "sequential_4_s", "batched_4_s", "batched_4_flops", "train_step_s", "train_step_flops", "peak_flops",
    "tokens_chunk10", "tokens_chunk2", "train_tokens", "floor_over_default", "fast_over_default",
    "chunk10_over_chunk2", "batched_over_sequential", "train_mfu",
)  # fmt: skip
RATIO_LINES = (
    "floor / measured default chunk time:",
    "fast / default chunk time:",
    "chunk 10 / chunk 2 latency:",
    "4 sessions batched / sequential throughput:",
    "training-step MFU:",
)


def run_bench(tmp_path: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # the ratios are the last lines, in this order, each ending in a finite positive number
    assert [line.split(":")[0] + ":" for line in lines[-len(RATIO_LINES) :]] == list(RATIO_LINES)
    for line in lines[-len(RATIO_LINES) :]:
        value = float(line.rsplit(":", 1)[1])
        assert math.isfinite(value) and value > 0, line
    for row in (
        "chunk 10 (default)",
        "chunk 10 (fast)",
        "chunk 2 (fast)",
        "4 sessions, one batch",
        "training step",
    ):
        assert any(line.startswith(row) for line in lines), row
    res = json.loads(out.read_text())
    for key in NUMBERS:
        assert math.isfinite(res[key]) and res[key] > 0, (key, res.get(key))
    # the FLOP counts follow from the token counts: the fast chunk is the same forwards, fewer of them
    assert res["default_chunk_flops"] > res["fast_chunk_flops"]
    assert res["batched_4_flops"] == 4 * res["fast_chunk_flops"]
    return res


@pytest.mark.slow
def test_smoke_run_prints_the_table_and_finite_ratios(tmp_path):
    res = run_bench(tmp_path, "--smoke", timeout=300)
    assert res["smoke"] is True and res["preset"] == "tiny" and res["device"] == "cpu"
    assert res["sampler_default"].startswith("euler 3 + AFG 3") and res["guidance_branches"] == 2


@pytest.mark.slow
def test_without_cuda_and_without_smoke_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real mode would run")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--smoke" in proc.stderr


@pytest.mark.gpu
@pytest.mark.slow
def test_real_mode_on_cuda(tmp_path):
    res = run_bench(tmp_path, "--steps", "2", "--fast-steps", "2", "--reps", "1", timeout=900)
    assert res["smoke"] is False and res["preset"] == "wan2.1-1.3b" and res["size"] == [480, 832]
    assert res["tokens_chunk10"] == 16406  # 3,926 packed history + 12,480 target tokens
    assert 0 < res["train_mfu"] < 1 and 0 < res["floor_over_default"] < 1
