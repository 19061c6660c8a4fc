"""``stem-live bench``: stage and end-to-end timings, as measured, with the machine they ran on.

Every benchmark returns a JSON-able dict; ``run_bench`` adds the machine and the versions.
Timings are medians and 99th percentiles over repeats, first (compiling / warm-up) call excluded;
the pipeline's over every frame of the stream after the engine's start, whose cost it reports.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Callable

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
    from stem_live.lab.evaluate import frame_from_sim

    scope = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed))
    return [frame_from_sim(*scope.acquire()[:2]) for _ in range(n)]


# ----------------------------------------------------------------------------- stages


def bench_protocol(sizes=SIZES, repeats: int = 50) -> dict:
    """encode + decode of one frame message (zero-copy) per size."""
    from stem_live import protocol

    out = {}
    for size in sizes:
        f = protocol.Frame(seq=1, image=np.zeros((size, size), np.uint16))
        out[str(size)] = _time(lambda f=f: protocol.decode(protocol.encode(f)), repeats)
    return out


def bench_register(sizes=SIZES, repeats: int = 20) -> dict:
    """The engine's per-frame work (rigid registration + prediction) per size."""
    from stem_live.engine import Engine

    out = {}
    for size in sizes:
        frames = _sim_frames(size, 2)
        eng = Engine()
        eng.process(frames[0])
        out[str(size)] = _time(lambda eng=eng, frames=frames: eng.process(frames[1]), repeats)
    return out


def bench_locate(sizes=SIZES, repeats: int = 10) -> dict:
    """Both locators (and atomap where installed) at the sizes up to 1024 px (the U-Net takes
    seconds beyond); see :mod:`stem_live.lab.bench_locate`."""
    from stem_live.lab.bench_locate import bench_locate as _b

    return _b(sizes=tuple(s for s in sizes if s <= 1024), repeats=repeats)


def bench_track(sizes=SIZES, repeats: int = 20) -> dict:
    """``Tracker.update`` per frame on the simulator's drifting frames (columns located once,
    outside the clock), with the number of columns linked per frame."""
    from stem_live.locate import estimate_spacing, locate_classical
    from stem_live.track import Tracker

    out = {}
    for size in sizes:
        frames = _sim_frames(size, 6)
        img0 = np.asarray(frames[0].image, np.float32)
        spacing = float(estimate_spacing(img0))
        cols = [locate_classical(np.asarray(f.image, np.float32), spacing) for f in frames]
        tr = Tracker(spacing_px=spacing, history=64)
        tr.update(cols[0])
        k = [0]

        def step(tr=tr, cols=cols, k=k) -> None:
            k[0] += 1
            tr.update(cols[1 + k[0] % (len(cols) - 1)])

        out[str(size)] = {**_time(step, repeats), "columns": int(np.median([len(c) for c in cols]))}
    return out


def bench_gp(frames: int = 2000) -> dict:
    from stem_live.lab.bench_gp import bench_gp as _b

    return _b(frames=frames)


def bench_rvae() -> dict:
    from stem_live.lab.rvae_eval import bench_rvae as _b

    return _b()


# ----------------------------------------------------------------------------- pipeline


TARGET_HZ = {256: 20.0, 512: 10.0, 1024: 3.0, 2048: 1.0}  # end-to-end frame-rate targets (frames/s) per frame size
OFFER_FACTOR = 1.25  # the pipeline offers 25 % more than the target: "keeps up" is then measured, not given


def _start_sim(frames_ep: str, corr_ep: str, size: int, speed: float, preset: str, prerender: int = 0,
               seed: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stem_live.cli", "sim", "--size", str(size), "--preset", preset,
                             "--speed", str(speed), "--frames-endpoint", frames_ep, "--corrections-endpoint", corr_ep,
                             "--prerender", str(prerender), "--seed", str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _free_port_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _window_row(t_s: float, frame_ms: list[float]) -> dict:
    """One row of a long run's time series: elapsed s, median frame time, resident memory."""
    return {"t_s": round(t_s, 1), "frame_ms_median": round(float(np.median(frame_ms)), 2) if frame_ms else None,
            "rss_mb": round(rss_mb(), 1)}


def pipeline_engine(model: str = "gp", rvae: bool = True, max_columns: int = 2000, *,
                    compile_on_first_frame: bool = False, say: Callable[[str], None] | None = None):
    """The engine as the pipeline benchmark runs it: ``model`` gp (locate, track, GP, policy)
    plus, with ``rvae``, the rVAE encoder on every column (seeded random weights: encoding
    costs the same as with trained ones; buckets compiled before the clock starts), encoding up
    to ``max_columns`` columns a frame (the load the targets are set for). With
    ``compile_on_first_frame``, the engine of ``stem-live run``
    (:func:`stem_live.live_engine.compiling_engine`: compiles for the stream's first frame, lines
    to ``say``)."""
    from stem_live.engine import Engine, EngineConfig

    stage = None
    if rvae and model == "gp":
        from stem_live.rvae.model import RVAEConfig, init_params
        from stem_live.rvae.stage import RvaeStage

        stage = RvaeStage(init_params(RVAEConfig(), 0), warmup=False, max_columns=max_columns)
        stage.encoder.warmup()
    if compile_on_first_frame:
        from stem_live.live_engine import compiling_engine

        return compiling_engine(EngineConfig(model=model), say=say or (lambda _s: None), rvae=stage)
    return Engine(EngineConfig(model=model), rvae=stage)


def _drain(dq, into) -> list:
    """Move what a deque the worker appends to holds into ``into`` (popleft: no sample lost
    to an append between a copy and a clear); returns the moved values."""
    moved = []
    while True:
        try:
            moved.append(dq.popleft())
        except IndexError:
            break
    into.extend(moved)
    return moved


def bench_pipeline(size: int = 512, *, seconds: float = 10.0, rate_hz: float | None = None, model: str = "gp",
                   rvae: bool = True, prerender: int = 60, preset: str = "graphene", window_s: float = 60.0,
                   start_timeout_s: float = 300.0, progress: Callable[[str], None] | None = None) -> dict:
    """The whole engine fed through real sockets by the simulator in another process.

    The simulator pre-renders ``prerender`` frames of a seeded session (0: renders live, which
    takes one of this machine's cores from the engine) and publishes them at ``rate_hz``
    (default: ``OFFER_FACTOR`` x the target rate for this size, ``TARGET_HZ``, so that a
    processed rate at or above the target is a measurement, not the offered rate echoed back);
    the engine takes the newest frame.
    All stages on by default (``model`` gp + ``rvae``). The engine is the one of ``stem-live
    run``: it compiles for the stream's first frame (loaded from JAX's persistent cache when an
    earlier start compiled it) while the frames that arrive meanwhile are skipped: ``start``
    says how long that took from the first frame's arrival (``seconds``: the compilation, the
    first frame, and the garbage collection held off until then, ``gc_s``), and how many frames
    it cost (``start_cost_frames``: every frame sent before the first one processed after it).
    From the first frame's result on, ``seconds`` are measured and every frame counts, the
    stream's first ones included (reference, bootstrap, first hyperparameter fits): frames/s
    processed, the engine's capacity (1 / median busy time),
    latency from frame arrival to correction sent (p50, p99, max, the first five), per-stage
    median / p99, skipped frames, memory, per ``window_s`` the median frame time and memory
    (flat over a long run: ``seconds=1800``), and the jit work done after the start
    (``jit_after_start``: a function traced mid-stream stalls the frames).
    """
    import gc

    from simulator import Microscope, MicroscopeConfig
    from stem_live.live_engine import hold_gc
    from stem_live.service import EngineService

    rate = float(rate_hz or OFFER_FACTOR * TARGET_HZ.get(size, 2.0))
    scope = Microscope(MicroscopeConfig(preset=preset, size=size))
    speed = rate * (scope.frame_time_s + scope.config.frame_gap_s)  # multiple of the real scan rate
    frames_ep, corr_ep = _free_port_endpoint(), _free_port_endpoint()
    sim = _start_sim(frames_ep, corr_ep, size, speed, preset, prerender)
    if progress:
        progress(f"pipeline {size}px: building the engine, simulator pre-rendering {prerender} frames ...")
    release_gc = hold_gc()  # as `run` does, until the first frame's result
    engine = pipeline_engine(model, rvae, compile_on_first_frame=True,
                             say=(lambda s: progress(f"pipeline {size}px: {s}")) if progress else None)
    engine.arm()
    from stem_live.lab.jit_watch import JitWatch

    jit = JitWatch(load=model == "gp")  # the start's jit work; from the first result on, the stream's (a fresh count)
    # the bench's own bookkeeping in flat arrays (8 bytes a value, not a Python float each): with
    # lists a 30-minute run grows this process by 12 MB, mostly the bench's, not the engine's
    stages: dict[str, array] = {}
    n_cols = array("d")
    start: dict = {}

    def on_result(frame, result) -> None:  # the worker thread, after the service's counters
        c = svc.counters
        if not start:  # the first result: the compilation is behind it; the measurement starts here
            t_gc = time.monotonic()
            release_gc()
            start.update(t=time.monotonic(), gc_s=time.monotonic() - t_gc, processed=c.processed, skipped=c.skipped, received=c.received,
                         rvae_skipped=c.rvae_skipped, first_frame_ms=c.frame_ms[-1] if c.frame_ms else None,
                         jit=jit.result())
            c.latency_ms.clear()
            c.frame_ms.clear()
            jit.reset()
            return
        if "next_seq" not in start:  # frames older than this one were queued during the start: its cost
            start["next_seq"] = frame.seq
        for k, v in result.timings_ms.items():
            stages.setdefault(k, array("d")).append(v)
        if result.columns is not None:
            n_cols.append(len(result.columns))

    svc = EngineService(engine, frames_endpoint=frames_ep, corrections_endpoint=corr_ep,
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*", on_result=on_result)
    lat, frame_ms, windows = array("d"), array("d"), []
    try:
        svc.start()
        t_wait = time.monotonic()
        while not start:  # imports, the simulator's pre-rendering, the first frame and its compilation
            if time.monotonic() - t_wait > start_timeout_s or sim.poll() is not None:
                raise RuntimeError(f"no frame processed within {start_timeout_s:.0f} s (simulator "
                                   f"{'exited' if sim.poll() is not None else 'running'}, "
                                   f"{svc.counters.received} frames received)")
            time.sleep(0.02)
        mem0 = rss_mb()
        t0 = start["t"]
        n0, sk0, r0, rs0 = start["processed"], start["skipped"], start["received"], start["rvae_skipped"]
        svc.counters.rvae_ms.clear()
        last, win_ms, win_t0 = t0, [], t0
        while (now := time.monotonic()) - t0 < seconds:
            time.sleep(0.2)
            _drain(svc.counters.latency_ms, lat)
            new = _drain(svc.counters.frame_ms, frame_ms)
            win_ms.extend(new)
            if now - win_t0 >= min(window_s, seconds):
                windows.append(_window_row(now - t0, win_ms))
                win_ms, win_t0 = [], now
            if progress and now - last > 1.0:
                last = now
                progress(f"pipeline {size}px: {now - t0:.0f}/{seconds:.0f} s, "
                         f"{(svc.counters.processed - n0) / (now - t0):.1f} frames/s")
        elapsed = time.monotonic() - t0
        c = svc.counters
        processed = c.processed - n0
        _drain(c.latency_ms, lat)
        win_ms.extend(_drain(c.frame_ms, frame_ms))
        if win_ms:  # the last, partial window
            windows.append(_window_row(elapsed, win_ms))
        busy = stages.get("total", [])  # the frame path; the rVAE runs beside it in its own thread
        if c.rvae_ms:
            stages["rvae"] = array("d", c.rvae_ms)
        first_ms = start["first_frame_ms"]
        # the start's cost: every frame sent before the first one processed after the start (those
        # still in the sockets' buffers when it ended are skipped then, but were sent during it)
        cost = max(sk0, start["next_seq"] - svc.first_seq - 1 if "next_seq" in start else sk0)
        return {
            "size": size, "model": model, "rvae": bool(rvae and model == "gp"), "offered_hz": round(rate, 2),
            "prerendered_frames": prerender, "seconds": round(elapsed, 2), "processed": processed,
            "received": c.received - r0, "skipped": c.skipped - cost, "fps": round(processed / elapsed, 2),
            "rvae_skipped": c.rvae_skipped - rs0,
            "capacity_fps": round(1e3 / float(np.median(busy)), 2) if busy else None,
            "columns_per_frame": int(np.median(n_cols)) if n_cols else 0,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
            "latency_max_ms": round(float(np.max(lat)), 2) if lat else None,
            "latency_first_ms": [round(v, 2) for v in lat[:5]], "latency_n": len(lat),
            "first_frames_included": True,
            "frame_ms": _stats(frame_ms) if frame_ms else None,
            "stages": {k: _stats(v) for k, v in stages.items() if v},
            "windows": windows,
            "start": {"seconds": None if first_ms is None else round(first_ms / 1e3 + start["gc_s"], 2),
                      "compile_s": None if engine.compile_s is None else round(engine.compile_s, 2),
                      "gc_s": round(start["gc_s"], 3),
                      "frames_skipped": cost, "first_seq": svc.first_seq, "jit": start["jit"]},
            "start_cost_frames": cost,
            "jit_after_start": jit.result(),
            "rss_start_mb": round(mem0, 1), "rss_end_mb": round(rss_mb(), 1),
            "rss_growth_mb": round(rss_mb() - mem0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    finally:
        jit.close()
        svc.stop()
        release_gc()
        gc.unfreeze()  # the next run starts as a fresh process would
        if engine.rvae is not None:
            engine.rvae.close()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()


def publish(frames_ep: str, corr_ep: str, size: int, rate_hz: float, seconds: float, calm_hz: float = 0.0,
            calm_seconds: float = 0.0) -> None:
    """A bare instrument for the overload benchmark: publishes pre-rendered frames (forwards
    and backwards through a short seeded session: the specimen drifts to and fro, never
    jumps), first ``calm_seconds`` at ``calm_hz`` (stream "calm"), then ``seconds`` at
    ``rate_hz`` (stream "overload"); never blocking (PUB drops for a slow subscriber); acks
    every correction it receives. Prints the number of frames sent."""
    import zmq

    from stem_live import protocol

    frames = _sim_frames(size, 12)
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.setsockopt(zmq.SNDHWM, 2)
    pub.bind(frames_ep)
    router.bind(corr_ep)
    frame_s = frames[0].frame_time_s
    seq, t0 = 0, time.monotonic()
    nxt = t0
    while (el := time.monotonic() - t0) < calm_seconds + seconds:
        calm = el < calm_seconds
        period = 1.0 / (calm_hz if calm else rate_hz)
        while router.poll(0):
            ident, *body = router.recv_multipart()
            try:
                c = protocol.decode(body)
                ack = protocol.Ack(id=c.id, applied_nm=c.beam_shift_nm)
                router.send_multipart([ident, *protocol.encode(ack)])
            except (protocol.ProtocolError, AttributeError):
                pass
        f = frames[order[seq % len(order)]]
        f = protocol.Frame(seq=seq, image=f.image, t_start=seq * frame_s, pixel_size_nm=f.pixel_size_nm,
                           dwell_us=f.dwell_us, flyback_us=f.flyback_us, beam_shift_nm=(0.0, 0.0),
                           stream="calm" if calm else "overload")
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


def engine_capacity_fps(size: int, model: str = "gp", rvae: bool = True, repeats: int = 8) -> float:
    """Frames/s the engine (as :func:`pipeline_engine` builds it) processes back to back."""
    frames = _sim_frames(size, repeats + 4)
    eng = pipeline_engine(model, rvae)
    eng.arm()
    for f in frames[:4]:  # compilation, the GP window filling
        eng.process(f)
    t0 = time.perf_counter()
    for f in frames[4:]:
        eng.process(f)
    if eng.rvae is not None:
        eng.rvae.close()
    return repeats / (time.perf_counter() - t0)


def bench_overload(size: int = 512, *, seconds: float = 60.0, factor: float = 5.0, model: str = "gp",
                   rvae: bool = True, calm_seconds: float = 15.0, start_up_s: float = 15.0,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Frames published at ``factor`` x what the engine can process, for ``seconds``, after
    ``calm_seconds`` at half of it (the unloaded latency): the engine must keep taking the
    newest frame with bounded latency and flat memory, and count every skipped frame."""
    from stem_live.service import EngineService

    capacity = engine_capacity_fps(size, model, rvae)
    rate = factor * capacity
    frames_ep, corr_ep = _free_port_endpoint(), _free_port_endpoint()
    start_up = start_up_s  # the publisher's imports and pre-rendering happen during the calm phase
    pub = subprocess.Popen([sys.executable, "-c", "import sys; from stem_live.lab.bench import publish; "
                            "publish(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), "
                            "float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]))",
                            frames_ep, corr_ep, str(size), str(rate), str(seconds + 5), str(0.5 * capacity),
                            str(calm_seconds + start_up)],
                           stdout=subprocess.PIPE, text=True)
    engine = pipeline_engine(model, rvae)
    engine.arm()
    phase = {"stream": ""}

    def on_result(frame, result) -> None:
        phase["stream"] = frame.stream

    svc = EngineService(engine, frames_endpoint=frames_ep, corrections_endpoint=corr_ep,
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*", on_result=on_result)
    calm_lat, lat, mem = [], [], []
    try:
        svc.start()
        t0 = time.monotonic()
        while svc.counters.processed < 3:
            if time.monotonic() - t0 > 300 or pub.poll() is not None:
                raise RuntimeError("the publisher sent no frames within 300 s")
            time.sleep(0.05)
        svc.counters.latency_ms.clear()
        while phase["stream"] == "calm":
            time.sleep(0.5)
            calm_lat.extend(svc.counters.latency_ms)
            svc.counters.latency_ms.clear()
            if progress:
                progress(f"overload {size}px: calm phase at {0.5 * capacity:.1f} frames/s")
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
        pending = int(svc._frames.full)
        total = {"first_seq": svc.first_seq, "last_seq": svc._last_seq, "processed": c.processed,
                 "skipped": c.skipped, "failed": c.failed, "pending_at_stop": pending,
                 "unaccounted": int(svc._last_seq - svc.first_seq + 1 - c.processed - c.skipped - c.failed - pending)}
        p99 = round(float(np.percentile(lat, 99)), 2) if lat else None
        calm_p99 = round(float(np.percentile(calm_lat, 99)), 2) if calm_lat else None
        return {
            "size": size, "model": model, "rvae": bool(rvae and model == "gp"), "seconds": seconds,
            "engine_capacity_fps": round(capacity, 2), "publish_rate_hz": round(rate, 1),
            "processed": processed, "skipped": skipped,
            "seq_span": int(last_seq - first_seq), "accounted": processed + skipped,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "latency_p99_ms": p99, "unloaded_latency_p99_ms": calm_p99,
            "latency_p99_ratio": round(p99 / calm_p99, 3) if p99 and calm_p99 else None,
            "rss_first_mb": round(mem[0], 1), "rss_last_mb": round(mem[-1], 1),
            "rss_growth_mb": round(mem[-1] - mem[0], 1), "totals": total,
        }
    finally:
        svc.stop()
        if engine.rvae is not None:
            engine.rvae.close()
        pub.kill()
        pub.wait()


def run_bench(stage: str, *, sizes=SIZES, seconds: float = 10.0, model: str = "gp", rvae: bool = True,
              rate_hz: float | None = None, prerender: int = 60, progress: Callable[[str], None] | None = None
              ) -> dict:
    """Run one benchmark (or ``all``) and return the report with the machine."""
    report: dict = {"machine": machine(), "stage": stage}
    stages = (("protocol", "register", "locate", "track", "gp", "rvae", "pipeline", "overload")
              if stage == "all" else (stage,))
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
                                                    model=model, rvae=rvae, progress=progress)
            elif st == "locate":
                report["locate"] = bench_locate(sizes)
            elif st == "track":
                report["track"] = bench_track(sizes)
            elif st == "gp":
                report["gp"] = bench_gp()
            elif st == "rvae":
                report["rvae"] = bench_rvae()
            elif st == "pipeline":
                report["pipeline"] = {str(s): bench_pipeline(s, seconds=seconds, model=model, rvae=rvae,
                                                             rate_hz=rate_hz, prerender=prerender, progress=progress)
                                      for s in sizes}
            else:
                raise ValueError(f"unknown benchmark {st!r}")
        except ImportError as exc:
            report[st] = {"error": f"not available in this version ({exc})"}
    report["machine"] = machine()  # again: jax may have been imported by a stage
    return report


def summary_table(report: dict) -> str:
    """A few lines a person reads: the headline number of every stage that ran."""
    rows = []
    for st in ("protocol", "register", "track"):
        for size, r in (report.get(st) or {}).items():
            if isinstance(r, dict) and "median_ms" in r:
                rows.append(f"{st:9s} {str(size):>5s} px  median {r['median_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms")
    loc = report.get("locate") or {}
    if loc and "error" not in loc:
        from stem_live.lab.bench_locate import table

        rows.extend(f"locate    {line}" for line in table(loc).splitlines())
    gp = report.get("gp") or {}
    if "median_ms" in gp:
        rows.append(f"gp        stage median {gp['median_ms']} ms over {gp['frames']} frames; around frame 100 "
                    f"median {gp['median_ms_at_100']} / max {gp['max_ms_at_100']} ms; last 100 frames median "
                    f"{gp['median_ms_at_end']} / max {gp['max_ms_at_end']} ms")
    rv = report.get("rvae") or {}
    if "encode_patches_per_s" in rv:
        rows.append(f"rvae      encode {rv['encode_patches_per_s']:.0f} patches/s  train {rv.get('train_seconds')} s")
    for size, r in (report.get("pipeline") or {}).items():
        if isinstance(r, dict) and "fps" in r:
            st = "  ".join(f"{k} {v['median_ms']:.1f}" for k, v in r.get("stages", {}).items())
            start = r.get("start") or {}
            begin = (f"  start {start.get('seconds')} s, {r.get('start_cost_frames')} frames skipped"
                     if start else "")
            jit = r.get("jit_after_start") or {}
            mid = f", {jit['traces']} jit traces after it" if jit.get("traces") else ""
            rows.append(f"pipeline  {size:>5s} px  {r['fps']:6.2f} fps (offered {r['offered_hz']}, capacity "
                        f"{r['capacity_fps']})  latency p50 {r['latency_p50_ms']} / p99 {r['latency_p99_ms']} ms "
                        f"(first frames included)  skipped {r['skipped']}{begin}{mid}  rss +{r['rss_growth_mb']} MB  "
                        f"[{st}]")
    ov = report.get("overload") or {}
    if "latency_p99_ms" in ov:
        rows.append(f"overload  {ov['size']} px at {ov['publish_rate_hz']} Hz: latency p99 {ov['latency_p99_ms']} ms  "
                    f"rss +{ov['rss_growth_mb']} MB  processed {ov['processed']} skipped {ov['skipped']}")
    m = report.get("machine", {})
    rows.append(f"machine   {m.get('cpu')} ({m.get('cores')} cores), gpu {m.get('gpu')}")
    return "\n".join(rows)
