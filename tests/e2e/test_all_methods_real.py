"""All four steering methods in one request on the real embedded model (slow).

The fusion models are the embedded model itself as small base and expert (same
vocabulary, so start-up accepts them); the fused delta is then zero, which is not a
weak-to-strong result but runs the whole auxiliary-model path on real weights.
"""

from __future__ import annotations

import httpx
import pytest

from server.api.app import create_app
from server.settings import AuxModelSetting, Settings
from tests.conftest import EMBEDDED, LiveServer

pytestmark = pytest.mark.slow


def test_all_four_methods_on_the_embedded_model(real_bundle, tmp_path):
    aux = [AuxModelSetting(name="small", role="small_base", source=EMBEDDED),
           AuxModelSetting(name="expert", role="expert", source=EMBEDDED)]
    # Artifacts go to tmp_path; the converted-model cache is the suite's shared one.
    (tmp_path / "models").symlink_to(Settings().data_dir / "models")
    settings = Settings(model=EMBEDDED, data_dir=tmp_path, aux_models=aux)
    with LiveServer(create_app(settings, bundle=real_bundle)) as srv:
        post = lambda path, body: httpx.post(srv.url + path, json=body, timeout=300)  # noqa: E731
        r = post("/v1/priors", {"name": "kjv-small", "corpus": "kjv", "max_documents": 50})
        assert r.status_code == 201, r.text
        r = post("/v1/control-vectors", {
            "name": "mood", "template": "Act as if you are extremely {}.",
            "positive_words": ["happy", "joyful", "cheerful"],
            "negative_words": ["sad", "miserable", "gloomy"], "layers": [10, 11, 12]})
        assert r.status_code == 201, r.text
        body = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": 16, "temperature": 0, "diagnostics": True, "steering": [
                    {"type": "control", "vector": "mood", "alpha": 1.0},
                    {"type": "fusion", "experts": ["expert"], "base": "small",
                     "mode": "static", "alpha": [1.0]},
                    {"type": "ngram", "prior": "kjv-small", "lambda": 0.2},
                    {"type": "margin", "tau": 0.5, "gamma": 1.0}]}
        r = post("/v1/generate", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["text"].strip() and out["usage"]["completion_tokens"] > 0
        d = out["diagnostics"]
        assert d["base_ppl"] > 1 and d["style_ppl"] > 1 and "margin_acted_mean" in d
