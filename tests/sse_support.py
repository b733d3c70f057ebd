"""Reading Server-Sent Events streams in tests, from httpx responses (sync or async)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx


class SSEParser:
    """Feed lines; every completed event comes back as (name, JSON data)."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, dict] | None:
        if line == "":
            done = (self.event, json.loads("\n".join(self.data))) if self.data else None
            self.event, self.data = "message", []
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    parser = SSEParser()
    for line in response.iter_lines():
        if (event := parser.feed(line)) is not None:
            yield event


async def sse_events_async(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    parser = SSEParser()
    async for line in response.aiter_lines():
        if (event := parser.feed(line)) is not None:
            yield event
