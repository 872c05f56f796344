"""Entrypoints fail fast, with the field to fix, on a bad configuration (before starting Ray)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _encode(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "encode.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text('{"clip_id": "a", "uri": "a.mp4", "modality": "camera"}\n')
    return path


def test_encode_job_rejects_bad_config_with_the_field_name(tmp_path):
    run = _encode("preset=tiny", f"manifest={_manifest(tmp_path)}", "video.max_frames=10")
    assert run.returncode == 2
    assert "video.max_frames" in run.stderr and "1 + 4k" in run.stderr
    run = _encode("--config", str(tmp_path / "nope.yaml"))
    assert run.returncode == 2 and "--config: file not found" in run.stderr


def test_typo_gets_the_nearest_field_name(tmp_path):
    run = _encode(
        "preset=tiny", f"manifest={_manifest(tmp_path)}", "video.max_frame=33", "comput.shard_size=2"
    )
    assert run.returncode == 2, run.stderr
    assert "did you mean 'video.max_frames'?" in run.stderr
    assert "did you mean 'compute'?" in run.stderr


def test_missing_manifest_is_a_clear_error_before_ray_starts(tmp_path):
    run = _encode("preset=tiny", "manifest=runs/nowhere/manifest.jsonl", cwd=tmp_path)
    assert run.returncode == 2
    # the path as resolved (absolute), no traceback, and Ray never started
    assert f"manifest: file not found: {tmp_path / 'runs/nowhere/manifest.jsonl'}" in run.stderr
    assert "Traceback" not in run.stderr and "Ray (" not in run.stderr + run.stdout


def test_help_lists_usage_and_exit_codes():
    run = _encode("--help")
    assert run.returncode == 0 and "ray job submit" in run.stdout and "Exit codes" in run.stdout
