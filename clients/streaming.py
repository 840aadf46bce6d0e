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
from clients.types import GenerateResponse, StreamEvent, TokenLogprob

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


class _Reader:
    """The sans-I/O part of a stream, shared by :class:`Stream` and :class:`AsyncStream`:
    lines in, events out, and the events collected into the non-streaming answer."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.done = False
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.last: StreamEvent | None = None

    def feed(self, line: str | None, response: httpx.Response | None) -> StreamEvent | None:
        """One line (``None`` at the end of the body); the event it completes, if any.
        Sets :attr:`done` at ``[DONE]``; raises on an error frame."""
        data = self._decoder.flush() if line is None else self._decoder.feed(line)
        if data is None:
            return None
        event = decode_event(data, response)
        if event is None:
            self.done = True
            return None
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *event.logprobs]
        self.last = event
        return event

    def response(self) -> GenerateResponse:
        """Everything read so far as a :class:`GenerateResponse` (needs the final event)."""
        last = self.last
        if last is None or last.finish_reason is None:
            raise exc.APIConnectionError("the stream ended before its final event")
        if last.usage is None:  # the server always sends it; never make counts up
            raise exc.APIStatusError("the stream's final event has no usage", status=200)
        return GenerateResponse(
            id=last.id, model=last.model, text="".join(self.text), token_ids=self.token_ids,
            finish_reason=last.finish_reason, usage=last.usage, diagnostics=last.diagnostics,
            logprobs=self.logprobs, warnings=last.warnings,
        )


class Stream:
    """A streaming generate (sync). The request is sent on first use, as with
    :class:`AsyncStream`: ``for ev in client.stream(...)`` and
    ``with client.stream(...) as s`` both work, and HTTP errors (e.g. a 400) are raised
    there. Use it as a context manager (or iterate to the end) so the connection is
    released."""

    def __init__(self, opener: Callable[[], httpx.Response]) -> None:
        self._opener = opener
        self.response: httpx.Response | None = None
        self._events: Generator[StreamEvent, None, None] | None = None
        self._reader = _Reader()

    def _open(self) -> Generator[StreamEvent, None, None]:
        if self._events is None:
            self.response = self._opener()
            self._events = self._iter(self.response)
        return self._events

    def _iter(self, response: httpx.Response) -> Generator[StreamEvent, None, None]:
        reader = self._reader
        try:
            for line in response.iter_lines():
                event = reader.feed(line, response)
                if reader.done:
                    return
                if event is not None:
                    yield event
            if (event := reader.feed(None, response)) is not None:
                yield event
        except httpx.TransportError as e:
            raise _transport(e) from e
        finally:
            response.close()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._open()

    def __next__(self) -> StreamEvent:
        return next(self._open())

    def collect(self) -> GenerateResponse:
        """Read the rest of the stream; the whole answer as a :class:`GenerateResponse`."""
        for _ in self._open():
            pass
        return self._reader.response()

    def close(self) -> None:
        """Stop reading and release the connection (the server cancels the request)."""
        if self._events is not None:
            self._events.close()
        if self.response is not None:
            self.response.close()

    def __enter__(self) -> Stream:
        self._open()
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
        self._reader = _Reader()

    async def _open(self) -> AsyncGenerator[StreamEvent, None]:
        if self._events is None:
            self.response = await self._opener()
            self._events = self._iter(self.response)
        return self._events

    async def _iter(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        reader = self._reader
        try:
            async for line in response.aiter_lines():
                event = reader.feed(line, response)
                if reader.done:
                    return
                if event is not None:
                    yield event
            if (event := reader.feed(None, response)) is not None:
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
        return self._reader.response()

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
