"""Counting JAX's jit work while a benchmark runs (``jax.monitoring``)."""

from __future__ import annotations

import sys


class JitWatch:
    """Counts JAX's jit work while ``on`` (through ``jax.monitoring``): functions traced (each
    a new function or argument signature), their tracing seconds, persistent-cache hits and
    misses (a miss is an XLA compilation). A no-op where JAX is not imported (``load``: import it)."""

    _TRACE = "/jax/core/compile/jaxpr_trace_duration"
    _HIT = "/jax/compilation_cache/cache_hits"
    _MISS = "/jax/compilation_cache/cache_misses"

    def __init__(self, *, load: bool = False) -> None:
        self.reset()
        self._monitoring = None
        if load or "jax" in sys.modules:
            from jax import monitoring

            self._monitoring = monitoring
            monitoring.register_event_duration_secs_listener(self._duration)
            monitoring.register_event_listener(self._event)

    def _duration(self, name: str, seconds: float, **_kw) -> None:
        if name == self._TRACE:
            self.counts["traces"] += 1
            self.counts["trace_s"] += seconds

    def _event(self, name: str, **_kw) -> None:
        if name in (self._HIT, self._MISS):
            self.counts["cache_hits" if name == self._HIT else "cache_misses"] += 1

    def result(self) -> dict:
        return {**self.counts, "trace_s": round(self.counts["trace_s"], 3)}

    def reset(self) -> None:
        self.counts = {"traces": 0, "trace_s": 0.0, "cache_hits": 0, "cache_misses": 0}

    def close(self) -> None:
        m = self._monitoring
        if m is not None:
            m.unregister_event_duration_listener(self._duration)
            m.unregister_event_listener(self._event)
            self._monitoring = None
