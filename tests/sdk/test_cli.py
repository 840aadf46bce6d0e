"""The ``steer`` CLI, run as ``python -m clients.cli`` in a subprocess (and in-process
for the slower-to-spawn cases)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from clients import SteerClient
from clients.cli import main
from tests.conftest import free_port


def steer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_health_and_models(real_server):
    r = steer("--base-url", real_server.url, "health")
    assert r.returncode == 0 and "ok" in r.stdout
    r = steer("models", "--base-url", real_server.url, "--json")  # options after the command
    assert r.returncode == 0 and json.loads(r.stdout)["data"][0]["id"] == "tiny"


def test_generate_json(real_server):
    r = steer("--base-url", real_server.url, "generate", "hello", "--max-tokens", "4",
              "--temperature", "0", "--logit-bias", "70=100", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["token_ids"] == [70, 70, 70, 70] and body["usage"]["completion_tokens"] == 4


def test_error_exit_is_one_line(real_server):
    r = steer("--base-url", real_server.url, "generate", "x", "--temperature", "-1")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "400" in r.stderr and "temperature" in r.stderr
    r = steer("--base-url", f"http://127.0.0.1:{free_port()}", "--max-retries", "0", "models")
    assert r.returncode == 1 and "could not reach" in r.stderr and "Traceback" not in r.stderr


def test_stream_and_sweep_in_process(real_server, tmp_path, capsys):
    url = real_server.url
    assert main(["--base-url", url, "generate", "hi", "--stream", "--max-tokens", "3",
                 "--temperature", "0", "--logit-bias", "70=100"]) == 0
    assert capsys.readouterr().out.startswith("ddd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nabc\n")
    out = tmp_path / "rows.csv"
    code = main(["--base-url", url, "sweep", "--prompts", str(prompts), "--logit-bias", "70=0",
                 "--grid", "steering.0.bias.70=0,50", "--max-tokens", "4",
                 "--temperature", "0", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["steering.0.bias.70"] for e in summary] == [0, 50]
    assert summary[1]["overlap_mean"] <= 1.0 and summary[0]["overlap_mean"] == 1.0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and {r["prompt"] for r in rows} == {"hello", "abc"}


def test_usage_errors(real_server, tmp_path, capsys):
    url = real_server.url
    assert main(["--base-url", url, "sweep", "--prompt", "x", "--lambdas", "0,1"]) == 2
    assert "--prior" in capsys.readouterr().err
    assert main(["--base-url", url, "priors", "build", "p"]) == 2
    assert main(["--base-url", url, "vectors", "extract", "v", "--pairs",
                 str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(SystemExit):
        main(["sweep", "--lambdas", "a,b"])


def test_priors_list_and_missing(real_server, capsys):
    assert main(["--base-url", real_server.url, "priors", "list"]) == 0
    assert "(none)" in capsys.readouterr().out
    assert main(["--base-url", real_server.url, "priors", "show", "nope"]) == 1
    assert "404" in capsys.readouterr().err


def test_sweep_table_shows_style_and_base_ppl_by_default(real_server, capsys):
    url = real_server.url
    with SteerClient(url) as c:
        c.priors.build("clisweep", text="the cat sat on the mat. " * 30)
    try:
        code = main(["--base-url", url, "sweep", "--prompt", "the cat", "--prior", "clisweep",
                     "--lambdas", "0,0.5", "--max-tokens", "4"])
        assert code == 0
        header = capsys.readouterr().out.splitlines()[0].split()
        for column in ("overlap", "jaccard", "base_ppl", "style_ppl", "js_mean",
                       "argmax_flip_rate"):
            assert column in header
    finally:
        with SteerClient(url) as c:
            c.priors.delete("clisweep")


def test_control_flags_build_the_entries():
    from clients.cli import build_parser, steering_from

    args = build_parser().parse_args([
        "generate", "hi", "--vector", "mood", "--alpha-schedule", "2:0:16:cosine",
        "--window", "3:10", "--ablate", "refusal", "--ablate-strength", "0.5", "--layers", "4,5"])
    assert [e.to_wire() for e in steering_from(args)] == [
        {"type": "control", "mode": "ablate", "vector": "refusal", "strength": 0.5,
         "layers": [4, 5], "positions": {"from": 3, "to": 10}},
        {"type": "control", "vector": "mood", "layers": [4, 5], "preserve_norm": False,
         "alpha": {"start": 2.0, "end": 0.0, "over": 16, "shape": "cosine"},
         "positions": {"from": 3, "to": 10}}]
    args = build_parser().parse_args(["generate", "hi", "--vector", "m", "--after", "</think>"])
    assert steering_from(args)[0].to_wire()["positions"] == {"after": "</think>"}
    args = build_parser().parse_args(["generate", "hi", "--vector", "m", "--positions",
                                      "prompt", "--after", "x"])
    with pytest.raises(ValueError, match="at most one"):
        steering_from(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--alpha-schedule", "1:2"])
