"""All four steering methods in one request on the real embedded model (slow).

The fusion small base is the embedded model itself; the expert is a *perturbed copy* of
it (seeded noise on the last blocks' MLP weights, saved as an HF directory), so it shares
the vocabulary but not the distribution: the fused delta M_t − M_S is non-zero and the
fusion test can fail. A request with fusion alone checks that the distribution moved by
exactly what fusion's diagnostics report: with fusion the only entry, the steered
distribution is P̃, so the engine's KL(P_base‖P_steered) must equal fusion's
KL(P‖P̃), step by step, and be clearly above zero.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pytest
import torch

from server.api.app import create_app
from server.settings import AuxModelSetting, Settings
from tests.conftest import EMBEDDED, LiveServer

pytestmark = pytest.mark.slow


def perturbed_copy(bundle, out: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """Save the embedded model with seeded Gaussian noise (relative ``scale``) added to
    the MLP weights of its last 4 blocks: same tokenizer, a different distribution."""
    model = copy.deepcopy(bundle.model).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[-4:]:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                w = lin.weight
                noise = torch.randn(w.shape, generator=gen, dtype=w.dtype)
                w.add_(noise.to(w.device) * scale * w.std())
    model.save_pretrained(out)
    bundle.tokenizer.save_pretrained(out)
    del model
    return out


def test_all_four_methods_on_the_embedded_model(real_bundle, tmp_path):
    expert_dir = perturbed_copy(real_bundle, tmp_path / "expert")
    aux = [AuxModelSetting(name="small", role="small_base", source=EMBEDDED),
           AuxModelSetting(name="expert", role="expert", source=str(expert_dir))]
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
        assert d["fusion_kl_expert_small_mean"] > 1e-4  # the expert really differs

        # Fusion alone: the distribution moves by exactly what its diagnostics report.
        alone = {**body, "diagnostics": "steps", "steering": [
            {"type": "fusion", "experts": ["expert"], "base": "small", "mode": "static",
             "alpha": [1.0]}]}
        r = post("/v1/generate", alone)
        assert r.status_code == 200, r.text
        steps = r.json()["diagnostics"]["per_step"]
        moved, reported = steps["kl_base_steered"], steps["fusion_kl_strong_fused"]
        assert len(moved) == len(reported) == r.json()["usage"]["completion_tokens"]
        assert max(moved) > 1e-4  # fusion changed the distribution ...
        for m, k in zip(moved, reported, strict=True):  # ... by the reported amount
            assert m == pytest.approx(k, rel=1e-3, abs=1e-6)
