"""``GET /playground``: the browser playground, static files shipped in the package.

The page is plain HTML, CSS and JavaScript ES modules under ``server/static/playground``
(no CDN, no build step), so it works offline and installs with the wheel. It is not
behind the API key (like ``/health``): it holds no data, and its own calls to ``/v1/*``
send the key typed into its key field.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"


def install_playground(app: FastAPI) -> None:
    """Serve the page at ``/playground`` and its files under ``/playground/assets/``."""

    @app.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        # no-cache: a server upgrade must not leave a browser on an older page.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/playground/", include_in_schema=False)
    async def playground_slash() -> RedirectResponse:
        return RedirectResponse("/playground")

    app.mount("/playground/assets", StaticFiles(directory=STATIC_DIR), name="playground")
