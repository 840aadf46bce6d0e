"""Cancel engine work when the HTTP client of a non-streaming call goes away.

A streaming response notices a disconnect itself (its generator is closed and its
``finally`` cancels the rows); a non-streaming one is only awaiting results, so a task
reads the ASGI ``receive`` channel for ``http.disconnect`` meanwhile. The native
generate, the sweep and both OpenAI endpoints use this one helper.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import Request


async def _watch(request: Request, cancel: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(
    request: Request, cancel: Callable[[], None]
) -> AsyncIterator[None]:
    """Run the body with a watcher that calls ``cancel()`` if the client disconnects.

    ``cancel()`` also runs on the way out, however the body ended (finished, raised or
    was cancelled), so no engine row outlives its call; it must be idempotent.
    """
    watcher = asyncio.create_task(_watch(request, cancel))
    try:
        yield
    finally:
        cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
