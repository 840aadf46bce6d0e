"""Server-sent events of a streaming ``/v1/generate`` as typed iterators.

The server sends ``data: {json}`` frames (token deltas; the last has ``finish_reason``,
``usage`` and ``diagnostics``), then ``data: [DONE]``. An error after the stream began
arrives in-band as ``data: {"error": {...}}``; iterating raises it as the
:mod:`clients.exceptions` class of its ``code`` (e.g. ``ServiceUnavailableError``).

>>> with client.stream("Once upon", max_tokens=8) as s:   # doctest: +SKIP
...     for event in s:
...         print(event.text, end="")
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator
from types import TracebackType

import httpx

from clients import exceptions as exc
from clients._base import BaseClient
from clients.types import GenerateResponse, StreamEvent, Usage

DONE = "[DONE]"


class SSEDecoder:
    """Incremental SSE parser: feed lines, get the ``data`` payload of each event.

    Only ``data:`` fields matter here; multi-line data is joined with newlines, comments
    (``:``) and other fields are ignored, a blank line ends an event.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line (without its newline); returns an event's data when one completes."""
        line = line.rstrip("\r")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event if the stream ended without a blank line."""
        return self.feed("")


def decode_event(data: str, response: httpx.Response | None) -> StreamEvent | None:
    """One frame's data as an event; None for ``[DONE]``; raises on an error frame."""
    if data.strip() == DONE:
        return None
    try:
        payload = json.loads(data)
    except ValueError as e:
        raise exc.APIStatusError(
            f"malformed stream frame: {data[:200]!r}", status=200, response=response
        ) from e
    if isinstance(payload, dict) and "error" in payload:
        raise exc.from_stream_error(payload, response)
    return StreamEvent.model_validate(payload)


class _Collector:
    """Accumulates events into the non-streaming response shape."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.last: StreamEvent | None = None

    def add(self, event: StreamEvent) -> None:
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.last = event

    def response(self) -> GenerateResponse:
        last = self.last
        if last is None or last.finish_reason is None:
            raise exc.APIConnectionError("the stream ended before its final event")
        usage = last.usage or Usage(
            prompt_tokens=0, completion_tokens=len(self.token_ids),
            total_tokens=len(self.token_ids),
        )
        return GenerateResponse(
            id=last.id, model=last.model, text="".join(self.text), token_ids=self.token_ids,
            finish_reason=last.finish_reason, usage=usage, diagnostics=last.diagnostics,
        )


class Stream:
    """A streaming generate (sync): iterate for :class:`StreamEvent`; use as a context
    manager (or iterate to the end) so the connection is released."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._events = self._iter()
        self._collector = _Collector()

    def _iter(self) -> Generator[StreamEvent, None, None]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                event = decode_event(data, self.response)
                if event is None:
                    return
                self._collector.add(event)
                yield event
            tail = decoder.flush()
            if tail is not None and (event := decode_event(tail, self.response)) is not None:
                self._collector.add(event)
                yield event
        except httpx.TransportError as e:
            raise _transport(e) from e
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def collect(self) -> GenerateResponse:
        """Read the rest of the stream; the whole answer as a :class:`GenerateResponse`."""
        for _ in self._events:
            pass
        return self._collector.response()

    def close(self) -> None:
        """Stop reading and release the connection (the server cancels the request)."""
        self._events.close()
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream:
    """A streaming generate (async). The request is sent on first use, so both
    ``async for ev in client.stream(...)`` and ``async with client.stream(...) as s``
    work; HTTP errors (e.g. a 400) are raised there."""

    def __init__(self, opener: Callable[[], Awaitable[httpx.Response]]) -> None:
        self._opener = opener
        self.response: httpx.Response | None = None
        self._events: AsyncGenerator[StreamEvent, None] | None = None
        self._collector = _Collector()

    async def _open(self) -> AsyncGenerator[StreamEvent, None]:
        if self._events is None:
            self.response = await self._opener()
            self._events = self._iter(self.response)
        return self._events

    async def _iter(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                event = decode_event(data, response)
                if event is None:
                    return
                self._collector.add(event)
                yield event
            tail = decoder.flush()
            if tail is not None and (event := decode_event(tail, response)) is not None:
                self._collector.add(event)
                yield event
        except httpx.TransportError as e:
            raise _transport(e) from e
        finally:
            await response.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamEvent:
        events = await self._open()
        return await events.__anext__()

    async def collect(self) -> GenerateResponse:
        """Read the rest of the stream; the whole answer as a :class:`GenerateResponse`."""
        async for _ in self:
            pass
        return self._collector.response()

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        if self._events is not None:
            await self._events.aclose()
        if self.response is not None:
            await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        await self._open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _transport(e: httpx.TransportError) -> exc.APIConnectionError:
    return BaseClient.transport_error(e)
