"""``steerserve`` / ``python -m server``: start the HTTP server.

Flags override the ``STEER_*`` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every setting is also a ``STEER_*`` environment variable."""
    p = argparse.ArgumentParser(prog="steerserve", description=__doc__)
    p.add_argument("--host", help="bind address (STEER_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (STEER_PORT, default 8000)")
    p.add_argument("--model", help="model source (STEER_MODEL)")
    p.add_argument("--model-name", help="name reported by the API (STEER_MODEL_NAME)")
    p.add_argument("--data-dir", help="artifacts and model cache (STEER_DATA_DIR)")
    p.add_argument("--device", help="auto | cpu | cuda[:N] (STEER_DEVICE)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (STEER_DTYPE)")
    p.add_argument("--max-batch-size", type=int, help="STEER_MAX_BATCH_SIZE")
    p.add_argument("--log-level", help="debug | info | warning | error (STEER_LOG_LEVEL)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (non-zero if the model failed to load)."""
    args = parse_args(argv)
    import uvicorn
    from pydantic import ValidationError

    from server.api.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        print(f"steerserve: invalid settings: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    failed: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        os.kill(os.getpid(), signal.SIGTERM)  # stop uvicorn: a server without a model is useless

    app.state.on_load_error = on_load_error
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    if failed:
        print(f"steerserve: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
