"""Sweeps: the fallback to single requests on the real server, the server-side path on the
fake server, grid paths, metrics and SweepResult exports."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math

import pytest

from clients import (
    AsyncSteerClient,
    GenerateResponse,
    LogitBias,
    Margin,
    Ngram,
    NotFoundError,
    SteerClient,
    SweepResult,
    distinct_n,
    token_overlap,
)
from clients._grid import apply_params, expand_grid, reference_index, resolve_grid, set_path

from .conftest import envelope, gen_body

GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
PROMPTS = ["hello", "abc"]
GRID = {"steering.0.bias.70": [0, 3, 50]}


@pytest.mark.parametrize("server_sweep", [None, False], ids=["v1-sweep", "client-fallback"])
def test_sweep_equals_points_requested_one_by_one(real_server, server_sweep):
    with SteerClient(real_server.url, timeout=30) as c:
        result = c.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=GRID, concurrency=3,
                         diagnostics=True, server_sweep=server_sweep, **GREEDY)
        assert len(result) == 6
        for row in result.rows:
            bias = row.params["steering.0.bias.70"]
            solo = c.generate(row.prompt, steering=[LogitBias({70: bias})], **GREEDY)
            assert row.token_ids == solo.token_ids and row.text == solo.text
            assert row.metrics["completion_tokens"] == 6
            assert "js_mean" in row.metrics  # diagnostics flattened into the metrics
    for p in range(2):
        rows = [r for r in result.rows if r.prompt_index == p]
        assert rows[0].metrics["overlap"] == 1.0  # the 0 point is the reference
        assert rows[2].token_ids == [70] * 6
        expected = token_overlap(rows[2].token_ids, rows[0].token_ids)
        assert rows[2].metrics["overlap"] == expected
        assert rows[2].metrics["distinct_2"] == 0.2


def test_missing_sweep_endpoint_falls_back_to_generate(fake):
    srv, script = fake  # the fake has no /v1/sweep: a route 404 (no param)
    script.plan["/v1/generate"] = [(200, lambda body: gen_body(
        token_ids=[int(body["steering"][0]["bias"]["70"])]), {})]
    with SteerClient(srv.url) as c:
        res = c.sweep(["a", "b"], steering=[LogitBias({70: 0})], grid=GRID, concurrency=2)
        assert c._sweep_endpoint is False
        c.sweep(["c"], steering=[LogitBias({70: 0})], grid=GRID)  # not probed again
    assert script.hits == {"/v1/sweep": 1, "/v1/generate": 9}
    assert [r.token_ids for r in res.rows] == [[0], [3], [50]] * 2
    assert [r.metrics["overlap"] for r in res.rows] == [1.0, 0.0, 0.0] * 2


def test_async_sweep_matches_sync_fallback(real_server):
    grid = {"temperature": [0.0, 0.0], "steering.0.bias.70": [0, 50]}
    with SteerClient(real_server.url, timeout=30) as c:
        sync = c.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=grid, max_tokens=4,
                       ignore_eos=True, server_sweep=False)

    async def run() -> SweepResult:
        async with AsyncSteerClient(real_server.url, timeout=30) as ac:
            return await ac.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=grid,
                                  max_tokens=4, ignore_eos=True)

    got = asyncio.run(run())
    assert [r.token_ids for r in got.rows] == [r.token_ids for r in sync.rows]
    assert [r.params for r in got.rows] == [r.params for r in sync.rows]


def _server_sweep(body):
    points = expand_grid(body["grid"])
    results = [{"params": p, "response": gen_body(token_ids=[i, i])} for i, p in enumerate(points)]
    return {"results": results[::-1]}  # any order: the client matches by params


def test_server_sweep_endpoint_is_used_and_reordered(fake):
    srv, script = fake
    script.plan["/v1/sweep"] = [(200, _server_sweep, {})]
    with SteerClient(srv.url) as c:
        res = c.sweep(["a", "b"], steering=[Margin(tau=0.5, gamma=1.0),
                                            Ngram(prior="kjv", lam=0.0)],
                      lambdas=[0, 0.1], temperature=0.0, seed=3)
    assert script.hits == {"/v1/sweep": 2}
    sent = script.bodies[0]
    assert sent["grid"] == {"steering.1.lambda": [0, 0.1]}
    assert sent["request"]["steering"][1] == {"type": "ngram", "prior": "kjv", "lambda": 0.0,
                                              "scale": "raw"}
    assert sent["request"]["prompt"] == "a" and sent["request"]["seed"] == 3
    assert [r.token_ids for r in res.rows] == [[0, 0], [1, 1]] * 2
    assert [r.params for r in res.rows][:2] == [{"steering.1.lambda": 0},
                                                {"steering.1.lambda": 0.1}]


def test_sweep_404_for_an_artifact_is_raised_not_fallen_back(fake):
    srv, script = fake
    script.plan["/v1/sweep"] = [(404, envelope(404, "unknown prior 'x'", "steering.0.prior"), {})]
    with SteerClient(srv.url) as c:
        with pytest.raises(NotFoundError):
            c.sweep(["a"], steering=[Ngram(prior="x", lam=0)], lambdas=[0, 1])
    assert "/v1/generate" not in script.hits


def test_grid_helpers():
    body = {"temperature": 1.0, "steering": [{"type": "logit_bias", "bias": {"1": 2}}]}
    out = apply_params(body, {"steering.0.bias.70": 5, "temperature": 0.0, "top_k": 1})
    assert out == {"temperature": 0.0, "top_k": 1,
                   "steering": [{"type": "logit_bias", "bias": {"1": 2, "70": 5}}]}
    assert body["steering"][0]["bias"] == {"1": 2}  # deep copy
    with pytest.raises(ValueError, match="not an index"):
        set_path(dict(body), "steering.3.lambda", 1)
    with pytest.raises(ValueError, match="inside a float"):
        set_path(dict(body), "temperature.x", 1)
    assert expand_grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert reference_index([{"a": 0.5}, {"a": 0}]) == 1
    assert reference_index([{"a": 0.5}, {"a": 1}]) == 0
    with pytest.raises(ValueError, match="Ngram"):
        resolve_grid([LogitBias({1: 1})], None, [0, 1])
    assert resolve_grid([{"type": "ngram"}], {"seed": [1]}, [0]) == {
        "seed": [1], "steering.0.lambda": [0]}


def test_overlap_and_distinct():
    assert token_overlap([1, 2, 3, 4], [1, 2, 9]) == 0.5  # over the longer length
    assert token_overlap([], []) == 1.0
    assert distinct_n([1, 2, 1, 2, 1]) == 0.5  # bigrams 12 21 12 21 → 2 distinct of 4
    assert distinct_n([7]) == 0.0


def _resp(ids: list[int], **diag: float) -> GenerateResponse:
    return GenerateResponse.model_validate(gen_body(token_ids=ids, diagnostics=diag or None))


@pytest.fixture
def result() -> SweepResult:
    grid = {"steering.0.lambda": [0.0, 0.5]}
    responses = [
        [_resp([1, 2, 3, 4], js_mean=0.0), _resp([1, 2, 5, 5], js_mean=0.2)],
        [_resp([4, 4], js_mean=0.0), _resp([9, 9, 4], js_mean=0.4)],
    ]
    return SweepResult.from_responses(["p, with \"quotes\"\nand a newline", "q"], grid,
                                      responses)


def test_summary_numbers(result):
    s = result.summary()
    assert [e["steering.0.lambda"] for e in s] == [0.0, 0.5] and s[0]["n"] == 2
    assert s[0]["overlap_mean"] == 1.0 and s[0]["overlap_std"] == 0.0
    # prompt 0: 2 of 4 agree; prompt 1: [9,4,4] vs [4,4] → 0 of 3 (shift counts)
    assert s[1]["overlap_mean"] == pytest.approx(0.25)
    assert s[1]["overlap_std"] == pytest.approx(math.sqrt(0.125))
    assert s[1]["js_mean_mean"] == pytest.approx(0.3)
    assert s[1]["distinct_2_mean"] == pytest.approx((1.0 + 1.0) / 2)
    text = str(result)
    assert "steering.0.lambda" in text and "0.25 ± 0.3536" in text


def test_csv_and_json_round_trip(result, tmp_path):
    back = SweepResult.from_csv(result.to_csv(tmp_path / "r.csv"))
    assert back.grid == result.grid
    assert [r.record() for r in back.rows] == [r.record() for r in result.rows]
    back = SweepResult.from_json(result.to_json(tmp_path / "r.json"))
    assert [r.record() for r in back.rows] == [r.record() for r in result.rows]
    assert json.loads((tmp_path / "r.json").read_text())["summary"][1]["n"] == 2


def test_pandas_export(result):
    pytest.importorskip("pandas")
    df = result.to_pandas()
    assert list(df["overlap"]) == [r.metrics["overlap"] for r in result.rows]


def test_plot(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = result.plot(tmp_path / "s.png", metrics=["overlap", "js_mean"])
    assert path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------ comparable-points defaults


def _echo_sweep(body):
    """A /v1/sweep that answers every point with the request's seed as its token."""
    seed = body["request"].get("seed", -1)
    return {"results": [{"params": p, "response": gen_body(token_ids=[seed])}
                        for p in expand_grid(body["grid"])]}


def test_sweep_defaults_one_seed_per_prompt_and_diagnostics(fake):
    srv, script = fake
    script.plan["/v1/sweep"] = [(200, _echo_sweep, {})]
    stack = [Ngram(prior="kjv", lam=0.0)]
    with SteerClient(srv.url) as c:
        c.sweep(["a", "b", "c"], steering=stack, lambdas=[0, 0.1])
        sent = [b["request"] for b in script.bodies]
        assert [r["seed"] for r in sent] == [0, 1, 2]  # one per prompt, shared by its points
        assert all(r["diagnostics"] is True for r in sent)
        script.bodies.clear()
        c.sweep(["a", "b"], steering=stack, lambdas=[0, 0.1], seed=7, diagnostics=False)
        assert [(b["request"]["seed"], b["request"].get("diagnostics")) for b in script.bodies
                ] == [(7, False), (7, False)]
        script.bodies.clear()
        c.sweep(["a"], steering=stack, lambdas=[0, 0.1], independent=True)
        assert "seed" not in script.bodies[0]["request"]
        with pytest.raises(ValueError, match="independent"):
            c.sweep(["a"], steering=stack, lambdas=[0, 0.1], independent=True, seed=1)


def test_default_seed_makes_points_reproducible_solo_requests(real_server):
    """Sampling at temperature 1: every row equals a solo generate with seed = prompt
    index (the oracle), so a no-op point reproduces the reference exactly."""
    grid = {"steering.0.bias.70": [0, 0.5]}
    opts = {"max_tokens": 6, "ignore_eos": True, "temperature": 1.0}
    with SteerClient(real_server.url, timeout=30) as c:
        result = c.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=grid, **opts)
        for row in result.rows:
            solo = c.generate(row.prompt, steering=[LogitBias({70: row.params[
                "steering.0.bias.70"]})], seed=row.prompt_index, **opts)
            assert row.token_ids == solo.token_ids
            assert "js_mean" in row.metrics  # diagnostics on by default


def test_token_jaccard_is_position_free():
    from clients.sweep import token_jaccard

    assert token_jaccard([1, 2, 3], [9, 1, 2, 3]) == 0.75  # shifted: positional overlap 0
    assert token_overlap([1, 2, 3], [9, 1, 2, 3]) == 0.0
    assert token_jaccard([1, 1, 2], [1, 2, 2]) == 0.5  # multiset: min 1+1, max 2+2
    assert token_jaccard([], []) == 1.0 and token_jaccard([], [5]) == 0.0


def test_jaccard_metric_and_text_exports(result, tmp_path):
    # prompt 1 at λ=0.5: [9, 9, 4] vs reference [4, 4] → min 1 / max (2 + 2) = 0.25
    assert result.rows[3].metrics["jaccard"] == 0.25
    text = result.to_csv()
    assert isinstance(text, str)
    assert text == result.to_csv(tmp_path / "r.csv").read_bytes().decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["token_ids"] for r in rows] == [json.dumps(r.token_ids) for r in result.rows]
    doc = json.loads(result.to_json())
    assert doc == json.loads(result.to_json(tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [r["token_ids"] for r in doc["rows"]] == [r.token_ids for r in result.rows]


def test_tradeoff_plot(tmp_path):
    pytest.importorskip("matplotlib")
    grid = {"steering.0.lambda": [0.0, 0.5, 1.0]}
    rows = [[_resp([1, 2], base_ppl=10.0 * (k + 1), style_ppl=100.0 / (k + 1))
             for k in range(3)]]
    res = SweepResult.from_responses(["p"], grid, rows)
    path = res.plot(tmp_path / "t.png")  # both PPLs present: the trade-off panel is drawn
    assert path.read_bytes()[:4] == b"\x89PNG"
    from matplotlib.image import imread

    wide = imread(path).shape[1]
    res.plot(tmp_path / "n.png", tradeoff=False)
    assert imread(tmp_path / "n.png").shape[1] < wide  # one panel fewer
    plain = SweepResult.from_responses(["p"], grid, [[_resp([1]) for _ in range(3)]])
    with pytest.raises(ValueError, match="style_ppl"):
        plain.plot(tmp_path / "x.png", tradeoff=True)
