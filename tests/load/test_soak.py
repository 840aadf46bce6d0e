"""Soak: steady mixed load for a bounded time; RSS and open descriptors must not grow.

Two modes. The short one (``test_soak_short``, 40 s of load sampled every second, a 25 %
warm-up) runs in plain ``pytest`` / ``make test`` / CI, so a leak that shows within a
minute fails every build. The long one is opt-in (marker ``soak``): plain ``pytest``
deselects it (see tests/load/conftest.py); run it with ``pytest -m soak tests/load`` or
``STEER_SOAK=1 pytest tests/load``. ``STEER_SOAK_SECONDS`` sets its duration (default
120, clamped to [30, 300]).

The load is back-to-back bursts of the load test's mix (every steering stack, greedy and
seeded sampling, streamed and not, native and OpenAI, 30 % cancelled) at concurrency 24;
every completed request is checked against its solo run. Every 2 s the server's RSS
(``/proc/PID/status`` VmRSS) and open descriptors (``/proc/PID/fd``) are sampled. After a
warm-up (the first 15 % of the run) the samples are split in thirds: the median RSS of the
last third may exceed the first third's by at most max(24 MiB, 5 %), and the descriptor
medians by at most 8 (the client's pooled connections come and go). The least-squares
slope of RSS over the second half is reported, and asserted below 20 MiB/min (noise on a
two-minute run is a few MiB/min; a per-request leak of a KV cache shows as far more).
Idle descriptor counts before and after the run must match within 4.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

import pytest

from tests.load.conftest import (
    HealthPoller,
    ServerProcess,
    add_artifacts,
    check_counters,
    check_outcomes,
    expected_outputs,
    make_jobs,
    run_jobs,
    spec_pool,
)

CONCURRENCY = 24
BURST = 96  # requests per burst
SAMPLE_EVERY_S = 2.0
MiB = 2**20


def soak_seconds() -> float:
    return min(300.0, max(30.0, float(os.environ.get("STEER_SOAK_SECONDS", "120"))))


def slope_per_min(samples: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS (MiB per minute) over ``(t, rss, fds)`` samples."""
    ts = [s[0] for s in samples]
    ys = [s[1] / MiB for s in samples]
    tm, ym = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - tm) ** 2 for t in ts)
    return 60.0 * sum((t - tm) * (y - ym) for t, y in zip(ts, ys, strict=True)) / var


async def soak(srv: ServerProcess, duration: float, sample_every: float) -> dict:
    rng = random.Random(7)
    specs = spec_pool(rng, 18)
    ref = await expected_outputs(srv.url, specs)
    samples: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, srv.rss(), srv.fds()))
            try:
                await asyncio.wait_for(stop.wait(), sample_every)
            except (TimeoutError, asyncio.TimeoutError):
                pass

    totals = {"bursts": 0, "completed": 0, "cancelled": 0}
    everything: list = []
    async with HealthPoller(srv.url, interval=0.5) as health:
        task = asyncio.create_task(sampler())
        while time.monotonic() - t0 < duration:
            jobs = make_jobs(rng, specs, BURST, 0.3)
            outcomes = await asyncio.wait_for(run_jobs(srv.url, jobs, CONCURRENCY), 120)
            completed, cancelled = check_outcomes(outcomes, ref)
            everything += outcomes
            totals["bursts"] += 1
            totals["completed"] += completed
            totals["cancelled"] += cancelled
        stop.set()
        await task
    assert set(health.codes) == {200}, health.codes
    return {"samples": samples, **totals, "elapsed": time.monotonic() - t0,
            "outcomes": everything, "specs": specs}


@pytest.mark.soak
def test_soak_rss_and_fds_stay_flat(tmp_path) -> None:
    check_soak(tmp_path, soak_seconds(), SAMPLE_EVERY_S, warmup=0.15)


def test_soak_short(tmp_path) -> None:
    """The same checks over 40 s (the whole test stays under 60 s): runs in CI."""
    check_soak(tmp_path, 40.0, 1.0, warmup=0.25)


def check_soak(tmp_path, duration: float, sample_every: float, warmup: float) -> None:
    """Run the soak load for ``duration`` seconds and assert RSS/descriptors stay flat."""
    with ServerProcess(tmp_path, max_batch_size=16, max_queue=256, request_timeout_s=60) as srv:
        add_artifacts(srv)
        idle_fds_before = srv.fds()
        before = srv.wait_idle()
        run = asyncio.run(soak(srv, duration, sample_every))
        after = srv.wait_idle()
        time.sleep(1.0)  # let the server close the client's last keep-alive connections
        idle_fds_after = srv.fds()
        assert srv.alive(), srv.log_text()
        assert "Traceback" not in srv.log_text(), srv.log_text()[-4000:]

    samples = [s for s in run["samples"] if s[0] >= warmup * duration]
    assert len(samples) >= 9, run["samples"]
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    rss_first = statistics.median(s[1] for s in first)
    rss_last = statistics.median(s[1] for s in last)
    fds_first = statistics.median(s[2] for s in first)
    fds_last = statistics.median(s[2] for s in last)
    slope = slope_per_min(samples[len(samples) // 2:])

    cancelled = check_counters(before, after, run["outcomes"], solo_runs=len(run["specs"]))
    print(
        f"\nsoak: {run['elapsed']:.0f} s, {run['bursts']} bursts, {run['completed']} completed"
        f" + {run['cancelled']} cancelled (counter +{cancelled:.0f}), {len(run['samples'])}"
        f" samples; RSS first/last third median {rss_first / MiB:.1f} / {rss_last / MiB:.1f}"
        f" MiB (min {min(s[1] for s in samples) / MiB:.1f}, max"
        f" {max(s[1] for s in samples) / MiB:.1f}), second-half slope {slope:+.2f} MiB/min;"
        f" fds first/last third median {fds_first:.0f} / {fds_last:.0f} (max"
        f" {max(s[2] for s in samples)}), idle fds {idle_fds_before} -> {idle_fds_after}"
    )
    assert rss_last - rss_first <= max(24 * MiB, 0.05 * rss_first)
    assert slope < 20.0
    assert fds_last - fds_first <= 8
    assert idle_fds_after - idle_fds_before <= 4
    assert cancelled >= 0.8 * run["cancelled"]
    assert after["steerserve_requests_running"] == after["steerserve_requests_waiting"] == 0
