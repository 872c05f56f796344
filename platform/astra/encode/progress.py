"""Accounting of an encode run: where every manifest record went, progress lines, the quarantine report,
and the stage tracker + watchdog that say what is wrong when nothing moves.

Every manifest record lands in exactly one bucket per run:
    encoded + skipped (already stored) + skipped (quarantined before) + quarantined == manifest records
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class EncodeSummary:
    total: int = 0  # records in the manifest (good + rejected)
    encoded: int = 0  # clips stored completely by this run
    skipped_stored: int = 0  # stored completely by an earlier run
    skipped_quarantined: int = 0  # quarantined by an earlier run (and not retried)
    quarantined: int = 0  # quarantined by this run, at any stage (manifest and plan included)
    windows: int = 0  # latent rows written by this run (a long clip gives several)
    action_free: int = 0  # encoded clips without poses (no action rows)
    video_seconds: float = 0.0
    wall_seconds: float = 0.0  # the run: from the plan's end to the statistics written
    plan_seconds: float = 0.0  # reading the manifest and the store's catalog
    startup_seconds: float = 0.0  # starting / joining Ray (0 when there was nothing to do)
    first_result_seconds: float = 0.0  # from the run's start to the first finished clip
    reasons: dict[str, tuple[str, str]] = field(default_factory=dict)  # clip -> (stage, reason), this run
    store_uri: str = ""
    keys: set[str] = field(default_factory=set, repr=False)  # quarantine keys of the manifest's records

    @property
    def skipped(self) -> int:
        return self.skipped_stored + self.skipped_quarantined

    @property
    def accounted(self) -> int:
        return self.encoded + self.skipped + self.quarantined

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def video_hours_per_hour(self) -> float:
        return self.video_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        missing = self.total - self.accounted
        lost = f", {missing} UNACCOUNTED (a bug: please report)" if missing else ""
        return (
            f"encoded {self.encoded}, skipped {self.skipped} ({self.skipped_stored} stored, "
            f"{self.skipped_quarantined} quarantined before), quarantined {self.quarantined} of {self.total} "
            f"manifest records{lost}; {self.windows} windows written, {self.action_free} clips action-free.\n"
            f"time: plan {self.plan_seconds:.1f} s, Ray start-up {self.startup_seconds:.1f} s, run "
            f"{self.wall_seconds:.1f} s (first clip {self.first_result_seconds:.1f} s into the run): "
            f"{self.clips_per_second:.2f} clips/s, {self.video_hours_per_hour:.2f} hours of video per hour"
        )


def reason_kind(reason: str) -> str:
    """A reason with its numbers and quoted names blanked, so the same problem groups together."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text if len(text) <= 100 else text[:99] + "…"


def _clips(n: int) -> str:
    return f"{n} clip" if n == 1 else f"{n} clips"


def quarantine_report(rows: list[dict], this_run: int, location: str, top: int = 5) -> str:
    """A short report of quarantined clips (latest status per clip): top reasons, an example each."""
    if not rows:
        return "quarantine: none of the manifest's clips"
    kinds = Counter((r["stage"], reason_kind(r["reason"])) for r in rows)
    example = {}
    for r in rows:
        example.setdefault((r["stage"], reason_kind(r["reason"])), r)
    lines = [f"quarantine: {_clips(len(rows))} of the manifest ({this_run} this run); top reasons:"]
    for key, n in kinds.most_common(top):
        ex = example[key]
        lines.append(f"  {n:6d}  {key[0]:<8s} {key[1]}")
        lines.append(f"          e.g. {ex['clip_id']} ({ex['source_uri']})")
    if len(kinds) > top:
        lines.append(f"  ({len(kinds) - top} more kinds)")
    lines.append(f"  full table: {location}")
    return "\n".join(lines)


class StageTracker:
    """What each stage is doing right now (a Ray actor: the stages report, the watchdog reads)."""

    def __init__(self):
        self.active: dict[tuple[str, str], tuple[float, str]] = {}
        self.finished: Counter = Counter()

    def begin(self, stage: str, key: str, detail: str = "") -> None:
        self.active[(stage, key)] = (time.monotonic(), detail)

    def end(self, stage: str, key: str) -> None:
        self.active.pop((stage, key), None)
        self.finished[stage] += 1

    def snapshot(self) -> dict[str, dict]:
        now = time.monotonic()
        out: dict[str, dict] = {s: {"active": [], "finished": n} for s, n in self.finished.items()}
        for (stage, key), (start, detail) in self.active.items():
            out.setdefault(stage, {"active": [], "finished": 0})["active"].append((key, detail, now - start))
        return out


@contextlib.contextmanager
def interruptible_main() -> Iterator[None]:
    """Python's own SIGINT handler in the main thread while the block runs. The watchdog stops a stalled
    job with ``_thread.interrupt_main()``, which does nothing where SIGINT is ignored — as it is in a
    background job of a non-interactive shell (``cmd &`` in a script), which inherits it ignored."""
    if threading.current_thread() is not threading.main_thread() or callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Watchdog:
    """Calls ``explain(idle_s)`` when no progress was made for ``warn_after_s`` (and again every
    ``warn_after_s``), and ``give_up(idle_s)`` once ``fail_after_s`` passes. Runs in a daemon thread."""

    def __init__(
        self,
        warn_after_s: float,
        fail_after_s: float | None,
        explain: Callable[[float], None],
        give_up: Callable[[float], None],
    ):
        self.warn_after_s, self.fail_after_s = warn_after_s, fail_after_s
        self.explain, self.give_up = explain, give_up
        self.last = time.monotonic()
        self._warned_at = self.last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="encode-watchdog", daemon=True)

    def beat(self) -> None:
        self.last = self._warned_at = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        tick = min(1.0, self.warn_after_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            idle = now - self.last
            if self.fail_after_s is not None and idle >= self.fail_after_s:
                self.give_up(idle)
                return
            if now - self._warned_at >= self.warn_after_s:
                self._warned_at = now
                self.explain(idle)
