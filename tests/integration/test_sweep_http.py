"""POST /v1/sweep: grid expansion, shared prefill, equality with one-by-one requests."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import live_server, probe


@pytest.fixture(scope="module")
def srv(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("sweep"), max_sweep_points=8) as s:
        yield s


BASE = {"prompt": "sweep me", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "steering": [{"type": "logit_bias", "bias": {"70": 0.0}}]}


def test_sweep_equals_points_requested_one_by_one(srv):
    values = [0.0, 2.0, 5.0, 50.0]
    before = probe(srv.engine).prefill_rows
    r = httpx.post(srv.url + "/v1/sweep", timeout=60,
                   json={"request": BASE, "grid": {"steering.0.bias.70": values}})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [p["params"] for p in results] == [{"steering.0.bias.70": v} for v in values]
    assert probe(srv.engine).prefill_rows - before == 1  # one shared prefill for the 4 points
    for point, v in zip(results, values, strict=True):
        body = {**BASE, "steering": [{"type": "logit_bias", "bias": {"70": v}}]}
        single = httpx.post(srv.url + "/v1/generate", json=body, timeout=60).json()
        assert point["response"]["token_ids"] == single["token_ids"]
    assert results[-1]["response"]["token_ids"] == [70] * 8


def test_sweep_cartesian_product_and_limits(srv):
    r = httpx.post(srv.url + "/v1/sweep", timeout=60, json={
        "request": BASE, "grid": {"temperature": [0, 0.5], "seed": [1, 2]}})
    assert r.status_code == 200
    assert len(r.json()["results"]) == 4
    r = httpx.post(srv.url + "/v1/sweep", timeout=60, json={
        "request": BASE, "grid": {"temperature": [0, 0.1, 0.2], "seed": [1, 2, 3]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grid"


@pytest.mark.parametrize("grid, param", [
    ({"temperature": [-1]}, "request.temperature"),
    ({"steering.5.lambda": [0.1]}, "grid.steering.5.lambda"),
    ({"steering.0.bias.70": ["x"]}, "request.steering.0.bias.70"),
    ({}, "grid"),
    ({"temperature": []}, "grid.temperature"),
])
def test_sweep_bad_points_name_the_param(srv, grid, param):
    r = httpx.post(srv.url + "/v1/sweep", json={"request": BASE, "grid": grid}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
