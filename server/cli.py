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
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

    from server.api.state import ServerState

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
    p.add_argument("--weights", help="auto | fp32 | bf16 | int4 (STEER_WEIGHTS, default auto)")
    p.add_argument("--dtype", help="legacy: auto | float32 | bfloat16 | float16 (STEER_DTYPE)")
    p.add_argument("--max-batch-size", type=int, help="STEER_MAX_BATCH_SIZE")
    p.add_argument("--log-level", help="debug | info | warning | error (STEER_LOG_LEVEL)")
    p.add_argument("--api-key", help="key(s) clients must send, comma-separated (STEER_API_KEY)")
    p.add_argument("--shutdown-grace-s", type=float,
                   help="SIGTERM: seconds in-flight requests may finish (STEER_SHUTDOWN_GRACE_S)")
    return p.parse_args(argv)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Installed for SIGTERM/SIGINT *outside* uvicorn's serve loop: uvicorn re-raises
    the signal it handled after its graceful shutdown, and the default action would kill
    the process with -15 instead of letting ``main`` return its exit code."""


def make_server(config: uvicorn.Config, state: ServerState) -> uvicorn.Server:
    """A uvicorn server whose first SIGTERM/SIGINT starts the drain (503 to new requests,
    in-flight ones finish within the grace period, then are aborted)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                state.begin_drain(state.settings.shutdown_grace_s)
            super().handle_exit(sig, frame)

    return DrainingServer(config)


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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # A backstop only: the drain aborts what is left at shutdown_grace_s, which ends
        # every stream cleanly; uvicorn would cut connections at this timeout.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        # Beyond this many open connections uvicorn answers 503 at once instead of
        # letting idle sockets pile up until the process runs out of descriptors.
        limit_concurrency=settings.max_connections,
    )
    server = make_server(config, app.state.steer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_signal)
    server.run()
    if failed:
        print(f"steerserve: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
