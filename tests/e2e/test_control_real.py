"""Control vectors on the real embedded SmolLM2-135M-Instruct (slow).

A happy-vs-sad vector from 20 template pairs, extracted over HTTP, makes greedy answers
to several chat prompts measurably more positive at positive α than at negative α
(mean of a word-list score), and the GGUF export round-trips on the real geometry.
"""

from __future__ import annotations

import statistics

import httpx
import pytest

from tests.conftest import live_server

pytestmark = pytest.mark.slow

POSITIVE = ["happy", "joyful", "cheerful", "delighted", "ecstatic", "content", "elated", "glad",
            "thrilled", "optimistic"]
NEGATIVE = ["sad", "miserable", "gloomy", "depressed", "heartbroken", "unhappy", "devastated",
            "sorrowful", "hopeless", "pessimistic"]
GOOD = set("good great happy love wonderful amazing joy joyful excited beautiful fun glad smile "
           "enjoy enjoyed fantastic delighted best awesome cheerful exciting perfect".split())
BAD = set("bad sad terrible awful hate miserable sorry depressed lonely tired cry pain angry "
          "worst unfortunately gloomy hopeless dark heartbroken boring".split())
PROMPTS = ["Tell me about your weekend.", "How was your day?", "Describe the city you live in.",
           "Write a short note to a friend."]
LAYERS = list(range(8, 15))


def score(text: str) -> float:
    """(#positive − #negative words) per 10 words."""
    words = [w.strip(".,!?;:'\"()").lower() for w in text.split()]
    net = sum(w in GOOD for w in words) - sum(w in BAD for w in words)
    return 10.0 * net / max(1, len(words))


@pytest.fixture(scope="module")
def srv(real_bundle, tmp_path_factory):
    with live_server(real_bundle, tmp_path_factory.mktemp("control")) as s:
        yield s


def test_happy_sad_vector_steers_sentiment(srv):
    r = httpx.post(srv.url + "/v1/control-vectors", timeout=600, json={
        "name": "mood", "template": "Act as if you are extremely {}. Talk about your day.",
        "positive_words": POSITIVE, "negative_words": NEGATIVE,
        "suffixes": [" I feel", " Today was"], "chat": True, "layers": list(range(4, 20)),
    })
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["pairs"] == 20 and card["hidden_size"] == 576
    sep = {s["layer"]: s for s in card["separation"]}
    accuracy = [sep[k]["accuracy"] for k in LAYERS]
    assert statistics.mean(accuracy) >= 0.8, accuracy  # the contrast is linear there

    scores: dict[float, list[float]] = {-3.0: [], 3.0: []}
    kl: list[float] = []
    for prompt in PROMPTS:
        base = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
                "temperature": 0, "diagnostics": True,
                "steering": [{"type": "control", "vector": "mood", "alpha": 0, "layers": LAYERS}]}
        r = httpx.post(srv.url + "/v1/sweep", timeout=600,
                       json={"request": base, "grid": {"steering.0.alpha": [-3.0, 3.0]}})
        assert r.status_code == 200, r.text
        for point in r.json()["results"]:
            resp = point["response"]
            scores[point["params"]["steering.0.alpha"]].append(score(resp["text"]))
            kl.append(resp["diagnostics"]["kl_base_steered_mean"])
    happy, sad = statistics.mean(scores[3.0]), statistics.mean(scores[-3.0])
    assert happy > sad + 0.5, (scores, happy, sad)
    assert sum(a > b for a, b in zip(scores[3.0], scores[-3.0], strict=True)) >= 3
    assert all(x > 0.05 for x in kl)  # diagnostics see the steering (unsteered twins)

    gguf = httpx.get(srv.url + "/v1/control-vectors/mood/gguf", timeout=60)
    assert gguf.status_code == 200
    r = httpx.put(srv.url + "/v1/control-vectors/mood-copy/gguf", content=gguf.content,
                  timeout=60)
    assert r.status_code == 201 and r.json()["norms"] == card["norms"]
