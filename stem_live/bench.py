"""``stem-live bench``: stage and end-to-end timings, as measured, with the machine they ran on.

Every benchmark returns a JSON-able dict; ``run_bench`` adds the machine and the versions.
Timings are medians and 99th percentiles over repeats, first (compiling / warm-up) call excluded.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np

SIZES = (256, 512, 1024, 2048)


def machine() -> dict:
    """CPU model and cores, GPU as JAX sees it (only if JAX is already imported), versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["gpu"] = next((d.device_kind for d in jax.devices() if d.platform == "gpu"), None)
    except Exception:  # jax missing or no backend: report what there is
        info["gpu"] = None
    import zmq

    info["zmq"] = zmq.zmq_version()
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB), from /proc (Linux) or getrusage."""
    try:
        with open("/proc/self/status") as fh:
            for ln in fh:
                if ln.startswith("VmHWM:"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | None = None) -> float:
    """Current resident memory (MB) of a process (default: this one)."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as fh:
            for ln in fh:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=float)
    return {"median_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3), "n": len(a)}


def _time(fn: Callable[[], object], repeats: int) -> dict:
    fn()  # warm-up: compilation, caches
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return _stats(ms)


def _sim_frames(size: int, n: int, preset: str = "graphene", seed: int = 0) -> list:
    from simulator import Microscope, MicroscopeConfig

    from .evaluate import frame_from_sim

    scope = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed))
    return [frame_from_sim(*scope.acquire()[:2]) for _ in range(n)]


# ----------------------------------------------------------------------------- stages


def bench_protocol(sizes=SIZES, repeats: int = 50) -> dict:
    """encode + decode of one frame message (zero-copy) per size."""
    from . import protocol

    out = {}
    for size in sizes:
        f = protocol.Frame(seq=1, image=np.zeros((size, size), np.uint16))
        out[str(size)] = _time(lambda: protocol.decode(protocol.encode(f)), repeats)
    return out


def bench_register(sizes=SIZES, repeats: int = 20) -> dict:
    """The engine's per-frame work (rigid registration + prediction) per size."""
    from .engine import Engine

    out = {}
    for size in sizes:
        frames = _sim_frames(size, 2)
        eng = Engine()
        eng.process(frames[0])
        out[str(size)] = _time(lambda: eng.process(frames[1]), repeats)
    return out


def bench_locate(sizes=SIZES, repeats: int = 10) -> dict:
    from .locate.bench import bench_locate as _b

    return _b(sizes=tuple(s for s in sizes if s <= 1024), repeats=repeats)


def bench_gp(frames: int = 300) -> dict:
    from .distortion.bench import bench_gp as _b

    return _b(frames=frames)


def bench_rvae() -> dict:
    from .rvae.bench import bench_rvae as _b

    return _b()


# ----------------------------------------------------------------------------- pipeline


def _start_sim(frames_ep: str, corr_ep: str, size: int, speed: float, preset: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stem_live.cli", "sim", "--size", str(size), "--preset", preset,
                             "--speed", str(speed), "--frames-endpoint", frames_ep, "--corrections-endpoint", corr_ep],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def bench_pipeline(size: int = 512, *, seconds: float = 10.0, speed: float = 0.0, preset: str = "graphene",
                   progress: Callable[[str], None] | None = None) -> dict:
    """The whole engine fed through real sockets by the simulator in another process.

    ``speed`` 0 publishes as fast as the simulator renders (the engine takes the newest frame);
    otherwise a multiple of the real scan rate. Reports frames/s, latency from frame arrival to
    correction sent, per-frame time, skipped frames, and memory at start / end.
    """
    from .engine import Engine
    from .service import EngineService

    frames_ep, corr_ep = _free_port_endpoint(), _free_port_endpoint()
    sim = _start_sim(frames_ep, corr_ep, size, speed, preset)
    engine = Engine()
    engine.arm()
    svc = EngineService(engine, frames_endpoint=frames_ep, corrections_endpoint=corr_ep,
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*")
    lat, frame_ms, mem = [], [], []
    try:
        svc.start()
        t0 = time.monotonic()
        while svc.counters.processed < 3:  # start-up: imports, first frames, compilation
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the simulator sent no frames within 60 s")
            time.sleep(0.05)
        n0, sk0, r0 = svc.counters.processed, svc.counters.skipped, svc.counters.received
        mem0 = rss_mb()
        svc.counters.latency_ms.clear()
        t0 = time.monotonic()
        last = t0
        while (now := time.monotonic()) - t0 < seconds:
            time.sleep(0.2)
            lat.extend(svc.counters.latency_ms)
            svc.counters.latency_ms.clear()
            frame_ms.extend(svc.counters.frame_ms)
            svc.counters.frame_ms.clear()
            if now - last > 1.0:
                mem.append(rss_mb())
                last = now
                if progress:
                    progress(f"pipeline {size}px: {now - t0:.0f}/{seconds:.0f} s, "
                             f"{(svc.counters.processed - n0) / (now - t0):.1f} frames/s")
        elapsed = time.monotonic() - t0
        c = svc.counters
        processed = c.processed - n0
        return {
            "size": size, "seconds": round(elapsed, 2), "processed": processed,
            "received": c.received - r0, "skipped": c.skipped - sk0, "fps": round(processed / elapsed, 2),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
            "frame_ms": _stats(frame_ms) if frame_ms else None,
            "rss_start_mb": round(mem0, 1), "rss_end_mb": round(rss_mb(), 1),
            "rss_growth_mb": round(rss_mb() - mem0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    finally:
        svc.stop()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()


def publish(frames_ep: str, corr_ep: str, size: int, rate_hz: float, seconds: float) -> None:
    """A bare instrument for the overload benchmark: publishes pre-rendered frames at ``rate_hz``
    (never blocking: PUB drops for a slow subscriber) and acks every correction it receives."""
    import zmq

    from . import protocol

    frames = _sim_frames(size, 8)
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.setsockopt(zmq.SNDHWM, 2)
    pub.bind(frames_ep)
    router.bind(corr_ep)
    period, seq, t0 = 1.0 / rate_hz, 0, time.monotonic()
    nxt = t0
    while time.monotonic() - t0 < seconds:
        while router.poll(0):
            ident, *body = router.recv_multipart()
            try:
                c = protocol.decode(body)
                ack = protocol.Ack(id=c.id, applied_nm=c.beam_shift_nm)
                router.send_multipart([ident, *protocol.encode(ack)])
            except (protocol.ProtocolError, AttributeError):
                pass
        f = frames[seq % len(frames)]
        f = protocol.Frame(seq=seq, image=f.image, t_start=seq * period, pixel_size_nm=f.pixel_size_nm,
                           dwell_us=f.dwell_us, flyback_us=f.flyback_us, beam_shift_nm=(0.0, 0.0), stream="overload")
        try:
            protocol.send(pub, f, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        seq += 1
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
    print(seq, flush=True)
    pub.close(0)
    router.close(0)
    ctx.term()


def bench_overload(size: int = 512, *, seconds: float = 60.0, factor: float = 5.0,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Frames published at ``factor`` x what the engine can process, for ``seconds``: the engine must
    keep taking the newest frame with bounded latency and flat memory, and count every skipped frame."""
    from .engine import Engine
    from .service import EngineService

    capacity = 1e3 / bench_register((size,), repeats=10)[str(size)]["median_ms"]
    rate = factor * capacity
    frames_ep, corr_ep = _free_port_endpoint(), _free_port_endpoint()
    pub = subprocess.Popen([sys.executable, "-c", "import sys; from stem_live.bench import publish; "
                            "publish(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))",
                            frames_ep, corr_ep, str(size), str(rate), str(seconds + 5)],
                           stdout=subprocess.PIPE, text=True)
    engine = Engine()
    engine.arm()
    svc = EngineService(engine, frames_endpoint=frames_ep, corrections_endpoint=corr_ep,
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*")
    lat, mem = [], []
    try:
        svc.start()
        while svc.counters.processed < 3:
            time.sleep(0.05)
        svc.counters.latency_ms.clear()
        first_seq = svc._last_seq
        n0, sk0 = svc.counters.processed, svc.counters.skipped
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            lat.extend(svc.counters.latency_ms)
            svc.counters.latency_ms.clear()
            mem.append(rss_mb())
            if progress:
                progress(f"overload {size}px at {rate:.0f} frames/s: {time.monotonic() - t0:.0f}/{seconds:.0f} s")
        c = svc.counters
        last_seq = svc._last_seq
        processed, skipped = c.processed - n0, c.skipped - sk0
        svc.stop()  # then the totals are final: every frame from the first received is processed, skipped or pending
        pending = int(svc._pending is not None)
        total = {"first_seq": svc.first_seq, "last_seq": svc._last_seq, "processed": c.processed,
                 "skipped": c.skipped, "pending_at_stop": pending,
                 "unaccounted": int(svc._last_seq - svc.first_seq + 1 - c.processed - c.skipped - pending)}
        return {
            "size": size, "seconds": seconds, "engine_capacity_fps": round(capacity, 1), "publish_rate_hz": round(rate, 1),
            "processed": processed, "skipped": skipped,
            "seq_span": int(last_seq - first_seq), "accounted": processed + skipped,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
            "rss_first_mb": round(mem[0], 1), "rss_last_mb": round(mem[-1], 1),
            "rss_growth_mb": round(mem[-1] - mem[0], 1), "totals": total,
        }
    finally:
        svc.stop()
        pub.kill()
        pub.wait()


def run_bench(stage: str, *, sizes=SIZES, seconds: float = 10.0, progress: Callable[[str], None] | None = None
              ) -> dict:
    """Run one benchmark (or ``all``) and return the report with the machine."""
    report: dict = {"machine": machine(), "stage": stage}
    stages = ("protocol", "register", "locate", "gp", "rvae", "pipeline", "overload") if stage == "all" else (stage,)
    for st in stages:
        if progress:
            progress(f"bench {st} ...")
        try:
            if st == "protocol":
                report["protocol"] = bench_protocol(sizes)
            elif st == "register":
                report["register"] = bench_register(sizes)
            elif st == "overload":
                report["overload"] = bench_overload(sizes[0] if len(sizes) == 1 else 512, seconds=seconds,
                                                    progress=progress)
            elif st == "locate":
                report["locate"] = bench_locate(sizes)
            elif st == "gp":
                report["gp"] = bench_gp()
            elif st == "rvae":
                report["rvae"] = bench_rvae()
            elif st == "pipeline":
                report["pipeline"] = {str(s): bench_pipeline(s, seconds=seconds, progress=progress) for s in sizes}
            else:
                raise ValueError(f"unknown benchmark {st!r}")
        except ImportError as exc:
            report[st] = {"error": f"not available in this version ({exc})"}
    report["machine"] = machine()  # again: jax may have been imported by a stage
    return report
