"""A few client helpers for the rollout API (tests, benchmarks and demos use them)."""

from __future__ import annotations

import time

import httpx


def wait_ready(url: str, timeout_s: float = 180.0) -> None:
    """Block until ``GET {url}/readyz`` answers 200 (the ingress and a generator replica are up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready within {timeout_s:g} s")
        time.sleep(1)
