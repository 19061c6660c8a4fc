"""The one replay loop: every frame of a finite source through the engine, in order, losslessly,
and the credible ones into a :class:`~stem_live.io.results.ResultsWriter` (``stem-live replay
--results`` and every input of ``stem-live batch``, so their results are the same by construction).

A refused frame (``FrameRefused``) is counted and skipped; a lost frame (no significant match)
or a flagged one (no credible columns) is processed but not written. Errors reading the source
propagate: the caller says what they mean (a one-line user error, a failed batch row).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ReplayCounts", "replay_into"]


@dataclass
class ReplayCounts:
    """Frames ``read`` from the source, ``refused`` by the engine, ``lost`` (no significant
    match), ``flagged``, and ``written`` to the results; ``last_refusal``: the last refusal's reason."""

    read: int = 0
    refused: int = 0
    lost: int = 0
    flagged: int = 0
    written: int = 0
    last_refusal: str = ""


def replay_into(acquire: Callable[[], object], engine, writer=None, *, end: type[BaseException] = StopIteration,
                stop: threading.Event | None = None,
                on_frame: Callable[[int, object, object], None] | None = None) -> ReplayCounts:
    """Replay until ``acquire()`` raises ``end`` (e.g. ``instrument_adapters.base.EndOfStream``)
    or ``stop`` is set; returns the counts.

    engine: a :class:`stem_live.engine.Engine` (arm it first for the corrections to be recorded);
    writer: None or a ``ResultsWriter`` (gp model) that gets every frame neither lost nor flagged;
    on_frame(n, frame, result_or_refusal): after each frame (n from 1), the result or the
    ``FrameRefused`` exception, for progress lines."""
    from stem_live.engine import FrameRefused

    counts = ReplayCounts()
    while stop is None or not stop.is_set():
        try:
            frame = acquire()
        except end:
            break
        counts.read += 1
        try:
            r = engine.process(frame)
        except FrameRefused as exc:  # never processed; the replay goes on
            counts.refused += 1
            counts.last_refusal = str(exc).split(": ", 1)[-1]
            if on_frame is not None:
                on_frame(counts.read, frame, exc)
            continue
        counts.lost += int(r.lost)
        counts.flagged += int(bool(r.flagged))
        if writer is not None and not r.lost and not r.flagged:  # a flagged frame has no credible columns
            writer.add(frame, r, engine)
            counts.written += 1
        if on_frame is not None:
            on_frame(counts.read, frame, r)
    return counts
