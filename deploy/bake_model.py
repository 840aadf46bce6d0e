"""Convert a model source into a plain safetensors directory at build time.

    python deploy/bake_model.py embedded:smollm2-135m-instruct /opt/steerserve/models/NAME

The Dockerfile runs this so the image serves the embedded model without the ~30 s GGUF
conversion at start-up; point ``STEER_MODEL`` at the target directory to use it. Any source
that ``server.loading.resolve_source`` accepts works (a ``.gguf`` path, ``embedded:<name>``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path


def _make_world_readable(root: Path) -> None:
    """The cache is written under a 0700 temporary directory; the server runs unprivileged."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def bake(source: str, target: Path) -> Path:
    """Resolve ``source`` into a scratch data dir and move the cache to ``target``."""
    from server.loading import resolve_source

    if target.exists():
        raise SystemExit(f"bake_model: {target} already exists")
    scratch = Path(tempfile.mkdtemp(prefix="steerserve-bake-"))
    try:
        cache = resolve_source(source, scratch)
        if cache is None:
            raise SystemExit(f"bake_model: '{source}' has no weights to bake")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cache), str(target))
        _make_world_readable(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def main(argv: list[str]) -> int:
    """Command line: ``bake_model.py SOURCE TARGET``."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.monotonic()
    target = bake(argv[0], Path(argv[1]))
    files = sorted(p.name for p in target.iterdir())
    print(f"baked {argv[0]} into {target} in {time.monotonic() - t0:.1f} s: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
