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
from typing import TypeVar

from fastapi import Request


async def _watch(request: Request, cancel: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(
    request: Request, cancel: Callable[[], None], *, on_exit: bool = True
) -> AsyncIterator[None]:
    """Run the body with a watcher that calls ``cancel()`` if the client disconnects.

    ``cancel()`` also runs on the way out, however the body ended (finished, raised or
    was cancelled), so no engine row outlives its call; it must be idempotent. With
    ``on_exit=False`` it runs on the way out only when the body raised or was cancelled
    (a stream that peeked its first event keeps its rows for the response that follows).
    """
    watcher = asyncio.create_task(_watch(request, cancel))
    ok = False
    try:
        yield
        ok = True
    finally:
        if on_exit or not ok:
            cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


T = TypeVar("T")


async def peek_first(
    request: Request, events: AsyncIterator[T], cancel: Callable[[], None]
) -> tuple[T, AsyncIterator[T]]:
    """The first item of ``events`` and an iterator over all of them (that item again
    first), waiting with a disconnect watch.

    Streaming endpoints use it to send headers only once the first engine event is known:
    an error that ends a request before its first token (a steering stack whose logits
    turn non-finite, a dead engine) is then an HTTP status, not an in-band frame.
    """
    async with cancel_on_disconnect(request, cancel, on_exit=False):
        first = await anext(events)

    async def chained() -> AsyncIterator[T]:
        yield first
        async for item in events:
            yield item

    return first, chained()
