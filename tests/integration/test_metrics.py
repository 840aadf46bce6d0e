"""``GET /metrics``: Prometheus text format, contents after a burst with cancellations."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import live_server, parse_metrics


def scrape(srv) -> dict[str, float]:
    """Every sample as ``name{label=value,...}`` → value."""
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def wait_until(predicate, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_metrics_after_a_burst_with_cancellations(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, max_batch_size=2) as srv:
        m = scrape(srv)
        assert m["steerserve_requests_running"] == 0 and m["steerserve_requests_waiting"] == 0
        assert m["steerserve_model_load_seconds"] == tiny_bundle.load_seconds
        assert m["steerserve_requests_finished_total{finish_reason=stop}"] == 0

        long = {"model": "tiny", "prompt": "long", "max_tokens": 800, "temperature": 0,
                "ignore_eos": True, "stream": True}
        short = {"model": "tiny", "prompt": "short", "max_tokens": 5, "ignore_eos": True}
        started = threading.Barrier(3)
        release = threading.Event()

        def cancelled_stream() -> None:
            with httpx.stream("POST", srv.url + "/v1/completions", json=long,
                              timeout=60) as r:
                it = r.iter_lines()
                next(it)  # one token arrived: the request is running
                started.wait(30)
                release.wait(30)
            # leaving the block drops the connection mid-stream

        cancellers = [threading.Thread(target=cancelled_stream) for _ in range(2)]
        for t in cancellers:
            t.start()
        started.wait(30)  # both batch slots are busy with long rows
        # A client that gives up while its request still waits for a slot.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={**long, "stream": False},
                       timeout=0.5)
        results: list[httpx.Response] = []

        def completer(body: dict) -> None:
            results.append(httpx.post(srv.url + "/v1/completions", json=body, timeout=60))

        biased = {**short, "logit_bias": {"35": 5}}
        completers = [threading.Thread(target=completer, args=(b,))
                      for b in (short, short, biased)]
        for t in completers:
            t.start()
        wait_until(lambda: scrape(srv)["steerserve_requests_waiting"] == 3)
        busy = scrape(srv)
        assert busy["steerserve_requests_running"] == 2
        release.set()
        for t in cancellers + completers:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200, 200]
        wait_until(lambda: srv.engine.running == 0 and srv.engine.waiting == 0)

        m = scrape(srv)
        assert m["steerserve_requests_running"] == 0
        assert m["steerserve_requests_waiting"] == 0
        assert m["steerserve_requests_cancelled_total"] == 3
        assert m["steerserve_requests_finished_total{finish_reason=abort}"] == 3
        assert m["steerserve_requests_finished_total{finish_reason=length}"] == 3
        assert m["steerserve_e2e_request_latency_seconds_count"] == 6
        assert m["steerserve_steering_processor_requests_total{type=logit_bias}"] == 1
        # Admitted (and so produced tokens): 2 long rows, then the 3 short ones; the
        # request cancelled in the queue never was.
        admitted = m["steerserve_request_queue_time_seconds_count"]
        assert m["steerserve_time_to_first_token_seconds_count"] == admitted == 5
        gen = m["steerserve_generation_tokens_total"]
        assert gen >= 15 + 2  # the short ones in full, at least one token of each long one
        assert m["steerserve_inter_token_latency_seconds_count"] == gen - admitted
        assert m["steerserve_prompt_tokens_total"] >= 3 * 5
        assert m['steerserve_time_to_first_token_seconds_bucket{le=+Inf}'] == admitted


def test_two_apps_have_separate_registries(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path / "a") as a, \
            live_server(tiny_bundle, tmp_path / "b") as b:
        httpx.post(a.url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
        assert scrape(a)["steerserve_generation_tokens_total"] == 2
        assert scrape(b)["steerserve_generation_tokens_total"] == 0
