"""Container health check: exit 0 when ``GET /health`` answers 200, else 1.

Used by the image's HEALTHCHECK (no curl in the image). It asks the loopback address on
``STEER_PORT``; set ``STEER_HEALTH_URL`` to check somewhere else.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url() -> str:
    """The URL to probe, from ``STEER_HEALTH_URL`` or ``STEER_PORT``."""
    port = os.environ.get("STEER_PORT", "8000")
    return os.environ.get("STEER_HEALTH_URL", f"http://127.0.0.1:{port}/health")


def main() -> int:
    """Probe once; the exit status is what Docker records."""
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 (loopback URL)
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as err:  # 503 while the model loads
        print(f"{url}: {err.code}", file=sys.stderr)
    except OSError as err:
        print(f"{url}: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
