"""``steer``: the command line of the SDK.

    steer health | models
    steer generate PROMPT [--max-tokens N --temperature T --seed S --stream
                           --prior NAME --lam X --vector NAME --alpha A ...]
    steer sweep --prior kjv --lambdas 0,0.05,0.1,0.2 --prompts FILE --out results.csv
                --plot sweep.png
    steer priors build NAME (--text-file F | --corpus kjv) | list | show NAME | delete NAME
    steer vectors extract NAME --pairs FILE.jsonl --layers 3,4 | import NAME FILE.gguf |
                  export NAME FILE.gguf | list | show NAME | delete NAME

``--base-url`` / ``--api-key`` override ``$STEER_BASE_URL`` / ``$STEER_API_KEY``. Output
is a human-readable table unless ``--json``. Errors print one line on stderr and exit
non-zero (1: the server or connection failed, 2: bad arguments or input files).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clients import _format as fmt
from clients.client import SteerClient
from clients.exceptions import APIStatusError, SteerError
from clients.steering import (
    Ablate,
    After,
    Control,
    Guard,
    LogitBias,
    Margin,
    Ngram,
    PositionsLike,
    Schedule,
    SteeringLike,
    Tokens,
)
from clients.types import ContrastPair, Receipt

Handler = Callable[[SteerClient, argparse.Namespace], int]


# ----------------------------------------------------------------------------- output


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print JSON (``--json``) or the human-readable text."""
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        print(text)


def dump(model: Any) -> Any:
    """A pydantic model (or list of them) as JSON-able data."""
    if isinstance(model, list):
        return [dump(m) for m in model]
    if hasattr(model, "model_dump"):
        return model.model_dump(mode="json", exclude_none=True)
    return model


# ----------------------------------------------------------------------------- parsing helpers


def floats(text: str) -> list[float]:
    """``"0,0.05,0.1"`` → ``[0.0, 0.05, 0.1]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.1, got {text!r}") from None


def ints(text: str) -> list[int]:
    """``"3,4,5"`` → ``[3, 4, 5]``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,4, got {text!r}") from None


def grid_arg(text: str) -> tuple[str, list[Any]]:
    """``PATH=v1,v2`` → ``(PATH, [v1, v2])``; each value parsed as JSON if it can be."""
    path, sep, values = text.partition("=")
    if not sep or not path or not values:
        raise argparse.ArgumentTypeError(f"expected PATH=v1,v2,..., got {text!r}")
    return path, [_json_or_str(v) for v in values.split(",")]


def bias_arg(text: str) -> tuple[int, float]:
    """``ID=VALUE`` → ``(id, value)``."""
    token, sep, value = text.partition("=")
    try:
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=VALUE, got {text!r}") from None


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def steering_from(args: argparse.Namespace, *, lam_default: float = 0.1) -> list[SteeringLike]:
    """The steering stack of the steering flags, in a fixed order: raw ``--steering``
    entries, control vector, n-gram prior, logit bias, margin, then the guard last."""
    stack: list[SteeringLike] = []
    for raw in args.steering or []:
        try:
            entry = json.loads(raw)
        except ValueError:
            raise ValueError(f"--steering must be a JSON object, got {raw!r}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"--steering must be a JSON object, got {raw!r}")
        stack.append(entry)
    positions = control_positions(args)
    for name in getattr(args, "ablate", None) or []:
        stack.append(Ablate(vector=name, strength=args.ablate_strength, layers=args.layers,
                            positions=positions))
    if args.vector:
        alpha: float | Schedule = args.alpha
        if getattr(args, "alpha_schedule", None):
            alpha = args.alpha_schedule
        stack.append(Control(vector=args.vector, alpha=alpha, layers=args.layers,
                             positions=positions))
    if args.prior:
        lam = args.lam if args.lam is not None else lam_default
        stack.append(Ngram(prior=args.prior, lam=lam, scale=args.scale))
    if args.logit_bias:
        stack.append(LogitBias(bias=dict(args.logit_bias)))
    if args.margin:
        stack.append(Margin(tau=args.margin[0], gamma=args.margin[1]))
    beta, eps = getattr(args, "plausibility", None), getattr(args, "kl_budget", None)
    h = getattr(args, "entropy_scale", None)
    if beta is not None or eps is not None or h is not None:
        stack.append(Guard(plausibility=beta, kl_budget=eps, entropy_scale=h))
    return stack


def control_positions(args: argparse.Namespace) -> PositionsLike:
    """``--positions`` / ``--window FROM[:TO]`` / ``--after TEXT`` (at most one)."""
    window, after = getattr(args, "window", None), getattr(args, "after", None)
    given = [x for x in (window, after) if x is not None]
    if len(given) + (getattr(args, "positions", None) is not None) > 1:
        raise ValueError("give at most one of --positions, --window and --after")
    if window is not None:
        return window
    if after is not None:
        return After(after)
    return getattr(args, "positions", None) or "all"


def schedule_arg(text: str) -> Schedule:
    """``START:END:OVER[:SHAPE]``, e.g. ``2:0:16:cosine``."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected START:END:OVER[:SHAPE], got {text!r}")
    try:
        start, end, over = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END:OVER[:SHAPE], got {text!r}"
                                         ) from None
    shape = parts[3] if len(parts) == 4 else "linear"
    if shape not in ("linear", "cosine", "exp"):
        raise argparse.ArgumentTypeError(f"SHAPE must be linear, cosine or exp, got {shape!r}")
    return Schedule(start, end, over, shape)  # type: ignore[arg-type]  # checked above


def window_arg(text: str) -> Tokens:
    """``FROM[:TO]`` generated-token indices (``TO`` exclusive, optional)."""
    lo, _, hi = text.partition(":")
    try:
        return Tokens(int(lo), int(hi) if hi else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FROM[:TO], got {text!r}") from None


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling flags that were given (the rest take the server's defaults)."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "seed", "stop")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "diagnostics", None):
        out["diagnostics"] = True if args.diagnostics == "summary" else args.diagnostics
    return out


def receipt_table(receipt: Receipt) -> str:
    """One line per (entry, layer): positions acted on and ‖Δh‖/‖h‖ mean/max."""
    rows = []
    for e in receipt.entries:
        for layer, v in e.per_layer.items():
            rows.append({
                "entry": e.index, "vector": e.vector, "mode": e.mode, "layer": layer,
                "prompt": e.prompt_positions, "generated": e.generated_positions,
                "delta_mean": _num(v.delta_mean), "delta_max": _num(v.delta_max),
                "component_mean": _num(v.component_mean),
            })
    cols = ["entry", "vector", "mode", "layer", "prompt", "generated", "delta_mean",
            "delta_max", "component_mean"]
    return "receipt:\n" + fmt.table(rows, cols)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


# ----------------------------------------------------------------------------- commands


def cmd_health(client: SteerClient, args: argparse.Namespace) -> int:
    h = client.health()
    emit(args, dump(h), fmt.keyvalues(dump(h)))
    return 0 if h.ready else 1


def cmd_models(client: SteerClient, args: argparse.Namespace) -> int:
    models = client.models()
    cols = ["id", "role", "vocab_size", "context_length", "dtype", "device", "source"]
    emit(args, dump(models), fmt.table([dump(m) for m in models.data], cols))
    return 0


def cmd_generate(client: SteerClient, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {**sampling_from(args), "steering": steering_from(args)}
    if args.stream:
        with client.stream(args.prompt, **options) as stream:
            for event in stream:
                if args.json:
                    print(json.dumps(dump(event), ensure_ascii=False), flush=True)
                else:
                    print(event.text, end="", flush=True)
                    if event.finish_reason is not None:
                        print(f"\n[{event.finish_reason}]", file=sys.stderr)
        return 0
    r = client.generate(args.prompt, **options)
    text = r.text
    if r.diagnostics:
        text += "\n\n" + fmt.keyvalues(r.diagnostics)
    if r.receipt is not None:
        text += "\n\n" + receipt_table(r.receipt)
    emit(args, dump(r), text)
    if not args.json:
        u = r.usage
        print(f"[{r.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} "
              f"completion tokens]", file=sys.stderr)
    return 0


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts FILE`` (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts:
        text = Path(args.prompts).read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompts FILE or --prompt TEXT")
    return prompts


def cmd_sweep(client: SteerClient, args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    grid = dict(args.grid or [])
    if args.lambdas is not None and not args.prior and not any(
        '"ngram"' in s for s in (args.steering or [])
    ):
        raise ValueError("--lambdas needs --prior NAME (or an ngram --steering entry)")
    steering = steering_from(args, lam_default=0.0)
    if not grid and args.lambdas is None:
        raise ValueError("give --lambdas or --grid PATH=v1,v2")
    options = sampling_from(args)
    if args.no_diagnostics:
        options["diagnostics"] = False
    result = client.sweep(
        prompts, steering=steering, grid=grid or None, lambdas=args.lambdas,
        concurrency=args.concurrency, independent=args.independent, **options,
    )
    if args.out:
        out = Path(args.out)
        (result.to_json if out.suffix.lower() == ".json" else result.to_csv)(out)
        print(f"wrote {len(result)} rows to {out}", file=sys.stderr)
    if args.plot:
        metrics = args.metrics.split(",") if args.metrics else None
        result.plot(args.plot, metrics=metrics, tradeoff=args.tradeoff)
        print(f"wrote {args.plot}", file=sys.stderr)
    emit(args, result.summary(), str(result))
    return 0


def cmd_priors(client: SteerClient, args: argparse.Namespace) -> int:
    if args.action == "build":
        if (args.text_file is None) == (args.corpus is None):
            raise ValueError("give exactly one of --text-file or --corpus")
        text: str | list[str] | None = None
        if args.text_file:
            raw = Path(args.text_file).read_text(encoding="utf-8")
            text = [ln for ln in raw.splitlines() if ln.strip()] if args.lines else raw
        p = client.priors.build(
            args.name, text=text, corpus=args.corpus, estimator=args.estimator,
            weights=args.weights, max_documents=args.max_documents, timeout=args.timeout,
        )
        emit(args, dump(p), fmt.keyvalues(dump(p)))
    elif args.action == "list":
        lst = client.priors.list()
        cols = ["name", "estimator", "vocab_size", "compatible", "default_weights", "corpus"]
        text_out = fmt.table(lst.data, cols)
        if lst.skipped:
            text_out += "\n\nskipped (corrupt):\n" + fmt.table(lst.skipped, ["name", "reason"])
        emit(args, dump(lst), text_out)
    elif args.action == "show":
        p = client.priors.get(args.name)
        emit(args, dump(p), fmt.keyvalues(dump(p)))
    else:
        d = client.priors.delete(args.name)
        emit(args, dump(d), f"deleted prior '{d.name}'")
    return 0


def cmd_vectors(client: SteerClient, args: argparse.Namespace) -> int:
    v = client.vectors
    if args.action == "extract":
        pairs: list[ContrastPair] = []
        for n, line in enumerate(Path(args.pairs).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    pair = json.loads(line)
                    pairs.append(
                        ContrastPair(positive=pair["positive"], negative=pair["negative"])
                    )
                except (ValueError, KeyError, TypeError):
                    raise ValueError(
                        f"{args.pairs}:{n}: expected {{\"positive\": ..., \"negative\": ...}}"
                    ) from None
        cv = v.extract(args.name, pairs, layers=args.layers, method=args.method,
                       timeout=args.timeout)
        emit(args, dump(cv), fmt.keyvalues(dump(cv)))
    elif args.action == "import":
        cv = v.import_gguf(args.name, Path(args.file), timeout=args.timeout)
        emit(args, dump(cv), fmt.keyvalues(dump(cv)))
    elif args.action == "export":
        data = v.export_gguf(args.name, Path(args.file), timeout=args.timeout)
        emit(args, {"name": args.name, "file": args.file, "bytes": len(data)},
             f"wrote {len(data)} bytes to {args.file}")
    elif args.action == "list":
        lst = v.list()
        emit(args, dump(lst), fmt.table(lst.data, ["name", "layers", "method", "hidden_size"]))
    elif args.action == "show":
        cv = v.get(args.name)
        emit(args, dump(cv), fmt.keyvalues(dump(cv)))
    else:
        d = v.delete(args.name)
        emit(args, dump(d), f"deleted control vector '{d.name}'")
    return 0


# ----------------------------------------------------------------------------- parser


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Connection/output options, accepted before and after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--base-url", default=default, help="server URL (default $STEER_BASE_URL)")
    p.add_argument("--api-key", default=default, help="API key (default $STEER_API_KEY)")
    p.add_argument("--timeout", type=float, default=default if suppress else 600.0,
                   help="seconds per request (default 600)")
    p.add_argument("--max-retries", type=int, default=default if suppress else 2)
    p.add_argument("--json", action="store_true",
                   default=default if suppress else False, help="machine-readable output")
    return p


def _sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--diagnostics", nargs="?", const="summary", choices=["summary", "steps"],
                   help="report diagnostics ('steps' adds per-step values)")


def _steering(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument("--prior", help="n-gram style prior NAME")
    g.add_argument("--lam", type=float, help="n-gram lambda (generate default 0.1)")
    g.add_argument("--scale", choices=["raw", "zscore"], default="raw")
    g.add_argument("--vector", help="control vector NAME")
    g.add_argument("--alpha", type=float, default=1.0, help="control vector strength")
    g.add_argument("--layers", type=ints, help="control vector layers, e.g. 3,4,5")
    g.add_argument("--alpha-schedule", type=schedule_arg, metavar="START:END:OVER[:SHAPE]",
                   help="control strength over generated tokens (replaces --alpha)")
    g.add_argument("--positions", choices=["all", "prompt", "generated"],
                   help="control positions (default all)")
    g.add_argument("--window", type=window_arg, metavar="FROM[:TO]",
                   help="control only generated tokens FROM..TO-1 (0 = first)")
    g.add_argument("--after", metavar="TEXT",
                   help="control only after the generated text contains TEXT")
    g.add_argument("--ablate", action="append", metavar="NAME",
                   help="ablate the direction of control vector NAME (repeatable)")
    g.add_argument("--ablate-strength", type=float, default=1.0, metavar="S",
                   help="ablation strength in [0, 1] (default 1: remove the component)")
    g.add_argument("--logit-bias", type=bias_arg, action="append", metavar="ID=VALUE")
    g.add_argument("--margin", type=float, nargs=2, metavar=("TAU", "GAMMA"),
                   help="margin calibration, placed last")
    g.add_argument("--plausibility", type=float, metavar="BETA",
                   help="fluency guard: drop tokens with frozen-model P < BETA·max P (placed last)")
    g.add_argument("--kl-budget", type=float, metavar="NATS",
                   help="fluency guard: per-step KL(steered ‖ frozen) budget (placed last)")
    g.add_argument("--entropy-scale", type=float, metavar="NATS",
                   help="fluency guard: scale steering by min(1, H(frozen)/NATS) (placed last)")
    g.add_argument("--steering", action="append", metavar="JSON",
                   help="a raw steering entry, e.g. '{\"type\": \"margin\", ...}' (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The ``steer`` argument parser."""
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog="steer", parents=[_common(suppress=False)],
        description="Client for a steerserve server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    command("health", cmd_health, "server health (exit 1 unless ready)")
    command("models", cmd_models, "the models the server holds")

    g = command("generate", cmd_generate, "generate from one prompt")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    _sampling(g)
    _steering(g)

    s = command("sweep", cmd_sweep, "generate prompts over a grid of steering values")
    s.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--lambdas", type=floats, help="n-gram lambdas, e.g. 0,0.05,0.1")
    s.add_argument("--grid", type=grid_arg, action="append", metavar="PATH=v1,v2",
                   help="sweep a request path, e.g. temperature=0,0.7 (repeatable)")
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--out", metavar="FILE", help="write rows (.csv, or .json)")
    s.add_argument("--plot", metavar="FILE.png", help="save line charts (needs matplotlib)")
    s.add_argument("--metrics", help="metrics to plot, e.g. overlap,distinct_2")
    s.add_argument("--tradeoff", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the style-PPL vs base-PPL curve in --plot (default: when the "
                        "stack has a prior)")
    s.add_argument("--independent", action="store_true",
                   help="sample every grid point afresh (default: one seed per prompt, "
                        "the same at every point; --seed S sets it)")
    s.add_argument("--no-diagnostics", action="store_true",
                   help="skip the summary diagnostics (on by default for sweeps)")
    _sampling(s)
    _steering(s)

    pr = command("priors", cmd_priors, "n-gram style priors")
    pa = pr.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = pa.add_parser("build", parents=[common], help="train a prior")
    b.add_argument("name")
    b.add_argument("--text-file", metavar="FILE", help="corpus text (one document)")
    b.add_argument("--lines", action="store_true", help="one document per line of --text-file")
    b.add_argument("--corpus", help="a named corpus, e.g. kjv")
    b.add_argument("--estimator", choices=["jelinek_mercer", "kneser_ney"])
    b.add_argument("--weights", type=floats, help="w1,w2,w3")
    b.add_argument("--max-documents", type=int)
    pa.add_parser("list", parents=[common], help="list priors")
    for action in ("show", "delete"):
        pa.add_parser(action, parents=[common], help=f"{action} a prior").add_argument("name")

    ve = command("vectors", cmd_vectors, "control vectors")
    va = ve.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = va.add_parser("extract", parents=[common], help="extract from contrastive pairs")
    x.add_argument("name")
    x.add_argument("--pairs", required=True, metavar="FILE.jsonl",
                   help='one {"positive": ..., "negative": ...} per line')
    x.add_argument("--layers", type=ints)
    x.add_argument("--method", help="pca_diff | pca_center | mean_diff")
    for action, what in (("import", "upload a GGUF file"), ("export", "download as GGUF")):
        a = va.add_parser(action, parents=[common], help=what)
        a.add_argument("name")
        a.add_argument("file", metavar="FILE.gguf")
    va.add_parser("list", parents=[common], help="list control vectors")
    for action in ("show", "delete"):
        va.add_parser(action, parents=[common], help=f"{action} a vector").add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``steer``; returns the exit status (0 ok, 1 server/connection error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with SteerClient(args.base_url, args.api_key, timeout=args.timeout,
                         max_retries=args.max_retries) as client:
            return args.handler(client, args)
    except APIStatusError as e:
        where = f" (param: {e.param})" if e.param else ""
        print(f"steer: error {e.status}: {e.message}{where}", file=sys.stderr)
        return 1
    except SteerError as e:
        print(f"steer: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as e:
        print(f"steer: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
