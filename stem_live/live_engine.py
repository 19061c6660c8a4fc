"""The engine of a live stream: compiled for the stream's first frame before it takes it, with
the garbage collector held off while a command starts (``stem-live run``, the pipeline benchmark)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stem_live.engine import Engine
from stem_live.locate.buckets import compiling_in_background


class LiveEngine(Engine):
    """An :class:`~stem_live.engine.Engine` for a live stream: a side fit of the locator that
    needs a size not compiled yet compiles in a background thread and the frame goes on without
    it (``locate.buckets.compiling_in_background``: a live frame never waits 1-4 s for XLA);
    ``warm_up`` still compiles everything where it is needed."""

    _warming = False

    def warm_up(self, frames, *, strip_lines: int = 0) -> float:
        self._warming = True
        try:
            return super().warm_up(frames, strip_lines=strip_lines)
        finally:
            self._warming = False

    def process_strip(self, strip):
        if self._warming:
            return super().process_strip(strip)
        with compiling_in_background():
            return super().process_strip(strip)

    def process(self, frame, *, encode: bool = True):
        if self._warming:
            return super().process(frame, encode=encode)
        with compiling_in_background():
            return super().process(frame, encode=encode)


def compiling_engine(config, *, say: Callable[[str], None] = print, warm_frames: int = 3,
                     models: tuple[str, ...] = ("gp",), rvae: object | None = None) -> Engine:
    """An :class:`~stem_live.engine.Engine` that, for a model in ``models`` (the gp model: the
    rigid one compiles nothing), compiles for the stream's first frame before taking it: the
    first frame's size, from ``warm_frames`` copies of it (later in time, shifted a pixel each),
    with a line before and after (``say``). The frames that arrive meanwhile are skipped by the
    live service (it takes only the newest) and counted so; the first frame's own result comes
    after the compilation, and the frame after it becomes the reference, so the drift over the
    compilation is never taken for a jump. It is a :class:`LiveEngine`. ``compile_s``: the
    seconds the compilation took (None before it; 0.0 for a model that compiles nothing).
    ``rvae``: as ``Engine`` takes it."""
    from dataclasses import replace

    class CompilingEngine(LiveEngine):
        compiled = config.model not in models
        compile_s: float | None = 0.0 if compiled else None

        def process(self, frame, *, encode: bool = True):
            if self.compiled:   # warm_up's frames too: LiveEngine compiles those in place
                return super().process(frame, encode=encode)
            h, w = np.shape(frame.image)[:2]
            say(f"compiling the {self.config.model} model for {h}x{w} frames (once per size; a few seconds "
                f"when an earlier start compiled it, up to a minute the first time) ...")
            period = frame.frame_time_s
            copies = [replace(frame, seq=frame.seq + k, t_start=frame.t_start + k * period,
                              image=np.roll(frame.image, k, axis=1)) for k in range(warm_frames)]
            self.compiled = True  # warm_up calls process: those frames go straight through
            try:
                seconds = self.warm_up(copies)
            except BaseException:  # e.g. a refused frame: the next frame tries again
                self.compiled = False
                raise
            self.compile_s = seconds
            say(f"compiled in {seconds:.1f} s")
            result = super().process(frame, encode=encode)
            spacing = None if self._columns is None else self._columns.spacing_px
            self.reset()  # the next frame is the reference: not one from before the compilation
            if spacing and self._columns is not None:   # the same stream: not estimated again (0.5 s at 1024 px)
                self._columns.spacing_px = self._columns.tracker.spacing_px = spacing
            return result

    return CompilingEngine(config, rvae=rvae)


def hold_gc() -> Callable[[], None]:
    """Hold Python's cyclic garbage collector off while a command starts (``run``, ``replay``,
    the pipeline benchmark): the imports and JAX's tracing for the first frame make some
    400,000 objects, most of which live as long as the process; collecting while they are made
    (5 full collections) costs ~0.4 s of a warm start on 2 cores. Returns the function that
    ends the hold (call it after the first frame; once is enough, more calls do nothing): one
    collection frees the garbage made meanwhile (a third of them), what lives on is frozen
    (``gc.freeze``: no later collection scans it again, shorter pauses while frames stream), and
    the collector is turned back on (if it was on)."""
    import gc

    was_on = gc.isenabled()
    gc.disable()
    held = [True]

    def release() -> None:
        if held:
            held.clear()
            gc.collect()
            gc.freeze()
            if was_on:
                gc.enable()

    return release
