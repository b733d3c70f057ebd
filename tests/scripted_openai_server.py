"""A scripted OpenAI-compatible chat server (the stand-in for a remote LLM API, which cannot run here).

The scripted server answers the client's start-up probes itself and every other chat request with
whatever its `respond(request) -> str` function returns, counts
requests, can be told to fail the next requests with given status codes (429, 500, ...), can reject
JSON mode or logprobs as a server without them would, and reports usage as the number of
whitespace-separated words of the prompt and of the answer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from offline_pipeline.explain.llm_client import (
    PROBE_JSON_MESSAGE,
    PROBE_LOGPROBS_MESSAGE,
    PROBE_SCHEMA_MESSAGE,
)


def word_count(text: str) -> int:
    return len(text.split())


class ScriptedServer:
    def __init__(
        self,
        respond: Callable[[dict[str, Any]], str] = lambda request: "ok",
        model: str = "scripted-model",
        json_mode: bool = True,
        json_schema: bool = False,
        logprobs: bool = False,
        alternatives: Callable[[str], list[tuple[str, float]]] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.respond = respond
        self.model = model
        self.json_mode = json_mode
        self.json_schema = json_schema
        self.logprobs = logprobs
        self.alternatives = alternatives or (lambda token: [(token, 0.0)])
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []  # every chat request body that reached the server
        self.failures: list[int] = []  # status codes for the next chat requests, consumed in order
        self.retry_after: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            if self.failures:
                status = self.failures.pop(0)
                headers = {"retry-after": self.retry_after} if self.retry_after and status == 429 else {}
                return JSONResponse(
                    {"error": {"message": f"scripted failure {status}", "type": "test"}}, status, headers=headers
                )
            kind = (body.get("response_format") or {}).get("type")
            if (kind == "json_object" and not self.json_mode) or (kind == "json_schema" and not self.json_schema):
                return JSONResponse({"error": {"message": f"response_format {kind} is not supported"}}, 400)
            if body.get("logprobs") and not self.logprobs:
                return JSONResponse({"error": {"message": "logprobs are not supported"}}, 400)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                content = _probe_answer(body) if _is_probe(body) else self.respond(body)
            finally:
                self.in_flight -= 1
            prompt = sum(word_count(m.get("content") or "") for m in body["messages"])
            completion = word_count(content)
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            logprobs = None
            if body.get("logprobs"):
                # One token per character: simple, and exactly what the client must align to the text.
                logprobs = {
                    "content": [
                        {
                            "token": char,
                            "logprob": 0.0,
                            "bytes": None,
                            "top_logprobs": [
                                {"token": t, "logprob": lp, "bytes": None} for t, lp in self.alternatives(char)
                            ],
                        }
                        for char in content
                    ]
                }
            return {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            }

        return app

    def chat_requests(self, probes: bool = False) -> list[dict[str, Any]]:
        """The chat requests received, without the start-up probes unless asked."""
        return [r for r in self.requests if probes or not _is_probe(r)]


def _is_probe(body: dict[str, Any]) -> bool:
    content = body["messages"][-1].get("content") or ""
    return content in (PROBE_JSON_MESSAGE, PROBE_LOGPROBS_MESSAGE, PROBE_SCHEMA_MESSAGE)


def _probe_answer(body: dict[str, Any]) -> str:
    return "yes" if body["messages"][-1]["content"] == PROBE_LOGPROBS_MESSAGE else '{"ok": true}'


def log_weights(weights: dict[str, float]) -> list[tuple[str, float]]:
    """Top-logprob alternatives from probabilities."""
    return [(token, math.log(p)) for token, p in weights.items() if p > 0]
