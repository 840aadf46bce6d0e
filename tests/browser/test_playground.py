"""The playground in a real browser (Chromium via Playwright) against a real uvicorn
serving the tiny random model: page load, side-by-side streaming, the stack editor's
JSON, sweeps, server error messages, and the API-key field."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, live_server

STYLE_TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    with live_server(tiny_bundle, tmp_path_factory.mktemp("playground")) as srv:
        r = httpx.post(srv.url + "/v1/priors", json={"name": "cats", "text": STYLE_TEXT})
        assert r.status_code == 201, r.text
        yield srv


def open_page(watch, url: str) -> Any:
    page = watch.page
    page.goto(url + "/playground")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page


def add_ngram(page: Any, lam: float) -> None:
    page.select_option("#add-type", "ngram")
    page.click("#add-entry")
    entry = page.locator(".entry[data-type='ngram']").last
    entry.locator("input.val[name='lambda']").fill(str(lam))


def fill_sampling(page: Any, seed: int, max_tokens: int = 12) -> None:
    page.fill("#prompt", "the cat")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0.8")
    page.fill("#seed", str(seed))


def test_page_loads_without_console_errors(server, watch):
    page = open_page(watch, server.url)
    assert "tiny" in page.text_content("#model-info")
    assert "random:tiny" in page.text_content("#model-info")
    assert page.locator("#prior-list li").count() == 1  # filled from /v1/priors
    assert page.locator("#prior-corpus option").count() >= 1
    assert watch.errors == [] and watch.dialogs == []


def test_generate_streams_both_columns_and_sends_the_stack_json(server, watch):
    page = open_page(watch, server.url)
    fill_sampling(page, seed=11)
    add_ngram(page, 1.0)
    page.select_option("#add-type", "margin")
    page.click("#add-entry")
    sent: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/generate") and sent.append(r.post_data_json))
    statuses: list[int] = []
    page.on("response", lambda r: r.url.endswith("/v1/generate") and statuses.append(r.status))
    page.click("#generate")
    page.wait_for_selector("#out-steered[data-done='1']", timeout=60_000)

    expected = {  # what the form shows, written out by hand: the oracle
        "prompt": "the cat", "max_tokens": 12, "temperature": 0.8, "top_p": 1, "top_k": 0,
        "seed": 11, "diagnostics": "steps",
        "steering": [
            {"type": "ngram", "prior": "cats", "lambda": 1.0, "scale": "raw"},
            {"type": "margin", "tau": 0.5, "gamma": 1.0},
        ],
    }
    steered = next(b for b in sent if b["steering"])
    base = next(b for b in sent if not b["steering"])
    assert steered == {**expected, "stream": True}
    assert base == {**expected, "steering": [], "diagnostics": False, "stream": True}
    assert statuses == [200, 200]  # the server accepted exactly that JSON
    assert json.loads(page.text_content("#request-json")) == expected

    # Both columns streamed (several frames each) and steering changed the text.
    base_text, steered_text = page.text_content("#out-base"), page.text_content("#out-steered")
    assert base_text and steered_text and base_text != steered_text
    assert page.locator("#out-base span").count() > 1
    spans = page.locator("#out-steered span")
    assert spans.count() > 1
    # Same seed and stack sent directly: the oracle for the steered column's text.
    direct = httpx.post(server.url + "/v1/generate", json=expected, timeout=60).json()
    assert steered_text == direct["text"]
    # Per-token coloring: each token's hover value is the server's per-step KL.
    kl = direct["diagnostics"]["per_step"]["kl_base_steered"]
    assert spans.first.get_attribute("title").startswith("kl_base_steered = ")
    assert float(spans.first.get_attribute("data-value")) == pytest.approx(kl[0], rel=1e-6)
    assert "style_ppl" in page.text_content("#diagnostics")
    # "Copy as" reproduces the request: curl's body parses back to the same JSON.
    curl = page.text_content("#copy-curl")
    assert json.loads(curl.split("-d '", 1)[1].rstrip("'")) == expected
    python = page.text_content("#copy-python")
    assert "client.generate(" in python and "\"lambda\": 1" in python and "seed=11" in python
    assert watch.errors == [] and watch.dialogs == []


def test_sweep_plots_one_point_per_value(server, watch, tmp_path):
    page = open_page(watch, server.url)
    fill_sampling(page, seed=3, max_tokens=8)
    add_ngram(page, 0.0)
    page.fill("#sweep-path", "steering.0.lambda")
    page.fill("#sweep-values", "0,0.25,0.5,1")
    page.click("#run-sweep")
    page.wait_for_selector("#plot-metric", timeout=60_000)
    assert page.locator("#plot-metric circle.point").count() == 4
    assert page.locator("#plot-tradeoff circle.point").count() == 4
    assert page.locator("#sweep-table tr").count() == 5  # header + one row per value
    header = page.locator("#sweep-table tr").first.text_content()
    assert "style_ppl" in header and "base_ppl" in header and "jaccard" in header
    page.select_option("#sweep-metric", "js_mean")
    assert "js_mean vs lambda" in page.text_content("#plot-metric")
    with page.expect_download() as dl:
        page.click("#sweep-csv")
    csv_text = Path(dl.value.path()).read_text(encoding="utf-8")
    assert csv_text.splitlines()[0].startswith("value,") and len(csv_text.splitlines()) == 5
    shot = os.environ.get("STEER_PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png")
    page.click("#generate")
    page.wait_for_selector("#out-steered[data-done='1']", timeout=60_000)
    page.screenshot(path=shot, full_page=True)
    assert Path(shot).read_bytes()[:4] == b"\x89PNG"
    assert watch.errors == [] and watch.dialogs == []


def test_unknown_prior_shows_the_servers_message(server, watch):
    assert httpx.post(server.url + "/v1/priors", json={"name": "gone", "text": STYLE_TEXT}
                      ).status_code == 201
    page = open_page(watch, server.url)
    fill_sampling(page, seed=1, max_tokens=4)
    add_ngram(page, 0.5)
    page.locator(".entry[data-type='ngram'] select[name='prior']").select_option("gone")
    assert httpx.delete(server.url + "/v1/priors/gone").status_code == 200
    page.click("#generate")
    page.wait_for_selector("#message:not([hidden])", timeout=30_000)
    assert page.text_content("#message") == "404: unknown prior 'gone' (steering.0.prior)"
    # An artifact error lands in the artifacts panel, as the server's message.
    page.fill("#prior-name", "bad name!")
    page.fill("#prior-text", "some text")
    page.click("#build-prior")
    page.wait_for_function("document.querySelector('#artifact-message').textContent"
                           ".startsWith('400')")
    assert "name" in page.text_content("#artifact-message")
    assert watch.dialogs == []
    # The failed requests show in the console as network errors; no script error does.
    assert [e for e in watch.errors if "Failed to load resource" not in e] == []


def test_api_key_field(tiny_bundle, tmp_path, watch):
    with live_server(tiny_bundle, tmp_path, api_key="sekret-key") as srv:
        page = watch.page
        page.goto(srv.url + "/playground")  # the page itself needs no key
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert "API key" in page.text_content("#banner")
        page.fill("#api-key", "sekret-key")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelector('#model-info').textContent"
                               ".includes('random:tiny')")
        assert page.evaluate("sessionStorage.getItem('steerserve.apiKey')") == "sekret-key"
        fill_sampling(page, seed=2, max_tokens=4)
        page.click("#generate")
        page.wait_for_selector("#out-steered[data-done='1']", timeout=30_000)
        assert page.text_content("#message") == ""
        assert "Authorization: Bearer $STEER_API_KEY" in page.text_content("#copy-curl")
        assert "sekret-key" not in page.text_content("#copy-curl")  # never printed
        page.reload()  # kept for the tab's session
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.input_value("#api-key") == "sekret-key"


@pytest.mark.slow
def test_real_model_side_by_side_and_screenshot(real_bundle, tmp_path, watch):
    """The embedded model with a KJV prior: the steered column differs, and the page is
    photographed (``STEER_PLAYGROUND_SCREENSHOT=docs/playground.png`` refreshes the docs')."""
    with live_server(real_bundle, tmp_path) as srv:
        r = httpx.post(srv.url + "/v1/priors", json={"name": "kjv", "corpus": "kjv",
                                                     "max_documents": 300}, timeout=300)
        if r.status_code == 400 and "not installed" in r.text:
            pytest.skip("the kjv corpus is not installed")
        assert r.status_code == 201, r.text
        page = open_page(watch, srv.url)
        page.check("input[name=mode][value=chat]")
        page.fill("#chat-user", "Describe a quiet morning by the sea.")
        page.fill("#max_tokens", "40")
        page.fill("#temperature", "0.7")
        page.fill("#seed", "7")
        add_ngram(page, 0.4)
        page.select_option("#add-type", "margin")
        page.click("#add-entry")
        page.fill("#sweep-values", "0,0.2,0.4,0.6")
        page.click("#run-sweep")
        page.wait_for_selector("#plot-metric", timeout=300_000)
        assert page.locator("#plot-tradeoff circle.point").count() == 4
        page.click("#generate")
        page.wait_for_selector("#out-steered[data-done='1']", timeout=300_000)
        base_text, steered_text = page.text_content("#out-base"), page.text_content("#out-steered")
        assert base_text and steered_text and base_text != steered_text
        shot = os.environ.get("STEER_PLAYGROUND_SCREENSHOT") or str(tmp_path / "real.png")
        page.screenshot(path=shot, full_page=True)
        assert watch.errors == [] and watch.dialogs == []
