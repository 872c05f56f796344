"""Entrypoints fail fast, with the field to fix, on a bad configuration (before starting Ray)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_encode_job_rejects_bad_config_with_the_field_name(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "encode.py"),
            "preset=tiny",
            "manifest=m.jsonl",
            "video.num_frames=10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "video.num_frames" in run.stderr and "1 + 4k" in run.stderr
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "encode.py"), "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--config: file not found" in run.stderr
