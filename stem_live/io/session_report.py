"""The one-page figure of a live session (``stem-live run --report OUT.png``, ``demo --report
OUT.png``): the same figure as ``replay --results R.npz --report OUT.png``
(:func:`stem_live.io.figures.replay_figure`), drawn when the session ends from the per-frame
results kept while it ran (:class:`stem_live.io.results.ResultsWriter`'s records, in memory,
never an image; the last ``max_frames`` frames).

Use from a command (the service calls ``on_result(frame, result)`` from its worker thread)::

    on_result, finish_report = session_report(a.report, engine, on_result, source=a.frames)
    ...
    finish_report()          # after the service stopped: writes the PNG, says where on stderr
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["SessionReport", "session_report"]


class SessionReport:
    """Per-frame results of a session, kept for its figure.

    Raises ValueError (one line) for a name that is not ``.png``, a folder that does not exist,
    or an engine without the column model (the rigid model has no per-line drift or columns)."""

    def __init__(self, path: str | os.PathLike, engine, *, source: str = "", max_frames: int = 5000) -> None:
        from stem_live.io.results import ResultsWriter

        self.path = Path(path)
        if self.path.suffix.lower() != ".png":
            raise ValueError(f"--report {self.path}: the figure is a PNG, name it .png")
        if getattr(engine.config, "model", "gp") != "gp":
            raise ValueError("--report draws the column model's per-line drift and columns: use --model gp")
        self._writer = ResultsWriter(self.path.with_suffix(".npz"), info={
            "source": str(source), "model": "gp", "armed": bool(getattr(engine, "armed", False)),
            "corrections_applied": True})
        self.engine = engine
        self.max_frames = int(max_frames)
        self.failed = ""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._writer)

    def add(self, frame, result) -> None:
        """Keep one processed frame's results (lost, flagged or column-less frames are left out,
        as in ``replay --results``); never raises: the first error is kept in ``failed``."""
        if result is None or getattr(result, "lost", False) or getattr(result, "flagged", None) \
                or getattr(result, "columns", None) is None or self.failed:
            return
        with self._lock:
            try:
                self._writer.add(frame, result, self.engine)
            except Exception as exc:  # the live session goes on without its figure
                self.failed = " ".join(f"{type(exc).__name__}: {exc}".split())
                return
            if len(self._writer.records) > self.max_frames:
                del self._writer.records[:len(self._writer.records) - self.max_frames]

    def results(self) -> dict:
        """What was kept, as :func:`stem_live.io.results.load_results` returns a file."""
        with self._lock:
            arrays = self._writer.arrays()
        arrays["info"] = json.loads(str(arrays["info"]))
        return arrays

    def write(self) -> Path | None:
        """Draw the figure into ``path``; None when no frame was kept."""
        from stem_live.io.figures import replay_figure

        if not len(self):
            return None
        return Path(replay_figure(self.results(), self.path)["path"])


def session_report(path: str | os.PathLike | None, engine, on_result: Callable | None = None, *, source: str = "",
                   say: Callable[[str], None] | None = None) -> tuple[Callable, Callable[[], Path | None]]:
    """(on_result, finish): ``on_result(frame, result)`` that keeps the frame for the figure and then
    calls the given one; ``finish()`` writes the figure and says where (or why not) on stderr
    (``finish.report``: the :class:`SessionReport`). With ``path`` None: the given ``on_result``
    and a ``finish`` that does nothing."""
    def tell(text: str) -> None:
        (say or (lambda t: print(t, file=sys.stderr, flush=True)))(text)

    if path is None:
        return on_result or (lambda _f, _r: None), lambda: None
    report = SessionReport(path, engine, source=source)

    def keep(frame, result) -> None:
        report.add(frame, result)
        if on_result is not None:
            on_result(frame, result)

    def finish() -> Path | None:
        if report.failed:
            tell(f"report: not written ({report.failed})")
            return None
        out = report.write()
        tell(f"report -> {out}" if out is not None else "report: not written (no frame with columns was processed)")
        return out

    finish.report = report  # type: ignore[attr-defined]
    return keep, finish
