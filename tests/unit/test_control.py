"""Control-vector math, validation, the per-row delta builder and the GGUF codec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from processors.base import ModelGeometry, ParamError, ProcessorEnv
from processors.control import (
    ControlProcessor,
    ControlVector,
    apply_delta,
    build_phase,
    expand_template,
    fit_direction,
    phase_key,
)
from processors.control_gguf import GGUFFormatError, read_control_gguf, write_control_gguf
from processors.stack import ProcessorStack, parse_stack

D = 8


def toy_states(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs that differ along ``u`` by a varying gap (mean 3), plus shared content."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    content = 5 * torch.randn(n, D, generator=g)
    gap = 3 + torch.rand(n, 1, generator=g) * 2 - 1  # in [2, 4]
    noise = 0.1 * torch.randn(2, n, D, generator=g)
    pos = content + gap / 2 * u + noise[0]
    neg = content - gap / 2 * u + noise[1]
    return pos, neg, u


@pytest.mark.parametrize("method", ["pca_diff", "pca_center", "mean_diff"])
def test_fit_recovers_the_direction_oriented_and_scaled(method: str) -> None:
    pos, neg, u = toy_states()
    fit = fit_direction(pos, neg, method)
    v = torch.from_numpy(fit.vector).double()
    cos = float(v @ u.double() / v.norm())
    assert cos > (0.95 if method == "pca_diff" else 0.99)  # oriented: positives higher
    assert fit.gap == pytest.approx(float(v.norm()), rel=1e-5)
    assert fit.gap == pytest.approx(float(((pos - neg).double() @ (v / v.norm())).mean()))
    assert 2.5 < fit.gap < 3.5 and fit.accuracy == 1.0
    assert fit.separation > 1.0 and 0.9 < fit.explained <= 1.0
    # swapping positives and negatives flips the vector
    back = fit_direction(neg, pos, method)
    assert np.allclose(back.vector, -fit.vector, atol=1e-4)


def test_mean_diff_is_the_mean_difference_and_pca_falls_back() -> None:
    pos, neg, _ = toy_states(n=5)
    fit = fit_direction(pos, neg, "mean_diff")
    assert np.allclose(fit.vector, (pos - neg).mean(0).numpy(), atol=1e-5)
    one = fit_direction(pos[:1], neg[:1], "pca_diff")  # one pair: its difference
    assert np.allclose(one.vector, (pos[0] - neg[0]).numpy(), atol=1e-5)
    same = fit_direction(pos, neg, "pca_center")
    assert np.allclose(same.vector, fit_direction(pos, neg, "pca_diff").vector, atol=1e-4)
    with pytest.raises(ValueError, match="unknown method"):
        fit_direction(pos, neg, "umap")


def test_a_random_direction_does_not_separate() -> None:
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(40, D, generator=g), torch.randn(40, D, generator=g)
    toy_pos, toy_neg, _ = toy_states(40)
    assert fit_direction(pos, neg).separation < fit_direction(toy_pos, toy_neg).separation / 3


def test_expand_template() -> None:
    pairs = expand_template("Act as if you are extremely {}.", ["happy", "glad"], ["sad", "low"])
    assert pairs == [
        ("Act as if you are extremely happy.", "Act as if you are extremely sad."),
        ("Act as if you are extremely glad.", "Act as if you are extremely low."),
    ]
    assert expand_template("I {love|hate} it", [], []) == [("I love it", "I hate it")]
    with pytest.raises(ValueError, match="one length"):
        expand_template("{}", ["a"], [])
    with pytest.raises(ValueError, match="exactly one"):
        expand_template("{} {}", ["a"], ["b"])


# ------------------------------------------------------------------ validation
def vec(name: str = "v", layers: tuple[int, ...] = (1, 2), seed: int = 0) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector(name, {k: rng.standard_normal(D).astype(np.float32) for k in layers})


ENV = ProcessorEnv(
    vocab_size=16,
    control_vectors={"v": vec(), "w": vec("w", (0, 2), 1)},
    geometry=ModelGeometry(num_layers=3, hidden_size=D),
)


@pytest.mark.parametrize(
    ("params", "param", "status"),
    [
        ({}, "vector", 400),
        ({"vector": "nope"}, "vector", 404),
        ({"vector": "v", "alpha": "1"}, "alpha", 400),
        ({"vector": "v", "alpha": True}, "alpha", 400),
        ({"vector": "v", "alpha": 101}, "alpha", 400),
        ({"vector": "v", "alpha": float("nan")}, "alpha", 400),
        ({"vector": "v", "layers": []}, "layers", 400),
        ({"vector": "v", "layers": [0]}, "layers", 400),
        ({"vector": "v", "layers": [1, 1]}, "layers", 400),
        ({"vector": "v", "layers": [-1]}, "layers.0", 400),
        ({"vector": "v", "positions": "both"}, "positions", 400),
        ({"vector": "v", "preserve_norm": 1}, "preserve_norm", 400),
        ({"vector": "v", "lambda": 1}, "lambda", 400),
    ],
)
def test_validation_names_the_parameter(params: dict, param: str, status: int) -> None:
    with pytest.raises(ParamError) as err:
        ControlProcessor.validate(params, ENV)
    assert err.value.param == param and err.value.status == status


def test_validation_checks_the_model_geometry() -> None:
    other = dataclasses.replace(ENV, geometry=ModelGeometry(num_layers=2, hidden_size=D))
    with pytest.raises(ParamError, match="layer 2 does not exist"):
        ControlProcessor.validate({"vector": "v"}, other)
    assert ControlProcessor.validate({"vector": "v", "layers": [1]}, other).layers == (1,)
    wide = dataclasses.replace(ENV, geometry=ModelGeometry(num_layers=3, hidden_size=2 * D))
    with pytest.raises(ParamError, match="hidden size 8"):
        ControlProcessor.validate({"vector": "v"}, wide)


def test_control_entries_are_not_logits_stages() -> None:
    rows = [
        parse_stack([{"type": "control", "vector": "v"}], ENV, max_len=4),
        parse_stack([{"type": "logit_bias", "bias": {"1": 2.0}},
                     {"type": "control", "vector": "w", "alpha": -1}], ENV, max_len=4),
    ]
    stack = ProcessorStack(torch.device("cpu"), 16)
    stack.update_state(rows)
    assert [p.type_name for p in stack.processors()] == ["logit_bias"]


# ------------------------------------------------------------------ delta builder
def test_build_phase_per_row_slots_positions_and_norm() -> None:
    v, w = ENV.control_vectors["v"], ENV.control_vectors["w"]
    a = ControlProcessor.validate({"vector": "v", "alpha": 2.0, "positions": "prompt"}, ENV)
    b = ControlProcessor.validate(
        {"vector": "w", "alpha": -0.5, "layers": [2], "preserve_norm": True}, ENV
    )
    zero = ControlProcessor.validate({"vector": "v", "alpha": 0.0}, ENV)
    rows = [(a, b), (), (zero,), (b,)]
    cpu = torch.device("cpu")
    prompt = build_phase(rows, "prompt", cpu)
    assert prompt is not None and prompt.layers == (1, 2)
    s0, s1 = prompt.slots  # slot 0: each row's first addition; slot 1: its second
    assert s0.has.tolist() == [True, False, False, True]  # alpha 0 is no slot at all
    assert torch.equal(s0.dirs[1][0, 0], torch.from_numpy(v.directions[1]))
    assert torch.equal(s0.dirs[2][3, 0], torch.from_numpy(w.directions[2]))
    assert torch.equal(s0.dirs[2][1], torch.zeros(1, D))
    assert s0.a0.tolist() == [2.0, 0.0, 0.0, -0.5]
    assert s1.has.tolist() == [True, False, False, False] and sorted(s1.dirs) == [2]
    assert s0.preserve is not None and s0.preserve.view(-1).tolist() == [False] * 3 + [True]
    assert s1.preserve is not None and s1.preserve.view(-1).tolist() == [True] + [False] * 3
    gen = build_phase(rows, "generated", cpu)
    assert gen is not None and gen.layers == (2,)  # a is prompt-only
    assert build_phase([(zero,), ()], "prompt", cpu) is None  # alpha 0: nothing at all
    assert phase_key((a, b), "generated") != phase_key((b,), "generated")  # slot matters
    assert phase_key((zero,), "prompt") == ()


def test_apply_delta_preserves_norm_per_position() -> None:
    h = torch.randn(2, 5, D)
    delta = torch.randn(2, 1, D) * 3
    keep = torch.tensor([True, False]).view(2, 1, 1)
    out = apply_delta(h, delta, keep)
    assert torch.allclose(out[0].norm(dim=-1), h[0].norm(dim=-1), rtol=1e-5)
    assert torch.equal(out[1], h[1] + delta[1])
    assert torch.equal(apply_delta(h, torch.zeros(2, 1, D)), h)


# ------------------------------------------------------------------ persistence & GGUF
def test_artifact_round_trip() -> None:
    v = vec()
    v.info["method"] = "pca_diff"
    arrays, meta = v.to_artifact()
    back = ControlVector.from_artifact("v", arrays, meta)
    assert back.layers == v.layers and back.info == v.info
    assert all(np.array_equal(back.directions[k], v.directions[k]) for k in v.layers)
    with pytest.raises(ValueError):
        ControlVector.from_artifact("v", arrays, {**meta, "layers": [1]})


def test_gguf_round_trip_is_exact() -> None:
    v = ControlVector("x", {k: np.random.default_rng(k).standard_normal(D).astype(np.float32)
                            for k in (1, 4, 7)}, model_hint="llama")
    data = write_control_gguf(v)
    assert data[:4] == b"GGUF"
    back = read_control_gguf(data, "x", hidden_size=D, num_layers=8)
    assert back.layers == (1, 4, 7) and back.model_hint == "llama"
    for k in v.layers:
        assert back.directions[k].dtype == np.float32
        assert back.directions[k].tobytes() == v.directions[k].tobytes()


def _gguf_file(tensors: dict[str, np.ndarray], arch: str = "controlvector") -> bytes:
    import tempfile
    from pathlib import Path

    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_string(f"{arch}.model_hint", "llama")
        w.add_uint32(f"{arch}.layer_count", len(tensors))
        for name, arr in tensors.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "not a GGUF"),
        (np.random.default_rng(0).bytes(400), "not a GGUF"),
        (b"GGUF" + np.random.default_rng(1).bytes(400), "does not parse"),
        (_gguf_file({"direction.1": np.ones(D, np.float32)})[:-20], "does not parse"),
        (_gguf_file({"direction.1": np.ones(D + 1, np.float32)}), "hidden size"),
        (_gguf_file({"direction.1": np.ones(D, np.float16)}), "F32"),
        (_gguf_file({"direction.1": np.ones((2, D), np.float32)}), "1-D"),
        (_gguf_file({}), "no 'direction.N'"),
        (_gguf_file({"weights": np.ones(D, np.float32)}), "unexpected tensor"),
        (_gguf_file({"direction.9": np.ones(D, np.float32)}), "block 9"),
        (_gguf_file({"direction.1": np.full(D, np.nan, np.float32)}), "non-finite"),
        (_gguf_file({"direction.1": np.ones(D, np.float32)}, arch="llama"), "architecture"),
    ],
)
def test_bad_gguf_bodies_are_rejected(body: bytes, needle: str) -> None:
    with pytest.raises(GGUFFormatError, match=needle):
        read_control_gguf(body, "x", hidden_size=D, num_layers=4)
