"""An asyncio client for any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp server, OpenAI, StarMap).

- at most `concurrency` requests in flight (a semaphore);
- its own retry loop (the `openai` client runs with `max_retries=0`, so every retry is counted):
  exponential backoff with jitter on 429, 5xx, timeouts and connection errors, bounded attempts,
  and `Retry-After` honoured when the server sends it;
- the `usage` of every call is added to a `CostLedger`;
- responses are cached on disk by a hash of the request, so that a re-run makes zero requests;
- JSON mode, JSON-schema mode (structured outputs) and logprobs are detected once, by probe calls
  at start-up, and the result is cached next to the responses. A server that rejects a feature (HTTP 400/422) does not have it; any other
  failure of a probe is an error.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import openai

from offline_pipeline.explain.response_cache import ResponseCache, request_key

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)
REJECTED = (openai.BadRequestError, openai.UnprocessableEntityError)
PROBE_JSON_MESSAGE = 'Reply with this JSON object: {"ok": true}'
PROBE_LOGPROBS_MESSAGE = "Say yes."
PROBE_SCHEMA_MESSAGE = 'Reply with a JSON object whose "ok" is true.'
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


class LLMError(RuntimeError):
    """A request failed for good (retries exhausted, or a non-retryable error)."""


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str | None = None  # None: the first model the endpoint lists
    api_key: str | None = None
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    cache_dir: Path | None = None  # None: no response cache

    @classmethod
    def from_settings(cls, settings: Any) -> LLMConfig | None:
        """The endpoint configured in `Settings`, or None when there is none (the offline path)."""
        if not settings.llm_base_url:
            return None
        return cls(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            concurrency=settings.llm_concurrency,
            timeout_s=settings.llm_timeout_s,
            cache_dir=Path(settings.data_dir) / "cache" / "llm",
        )


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChatResult:
    text: str
    usage: Usage
    cached: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Capabilities:
    model: str
    json_mode: bool
    logprobs: bool
    json_schema: bool = False


@dataclass
class CostLedger:
    """What the calls cost. `input_tokens`/`output_tokens` are the recorded usage of every call, cached
    or not (the cost of the work); `billed_*` only that of requests that reached the server."""

    calls: int = 0
    cached_calls: int = 0
    requests: int = 0
    retries: int = 0
    probe_requests: int = 0
    calls_without_usage: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    billed_input_tokens: int = 0
    billed_output_tokens: int = 0

    def summary(self) -> str:
        return (
            f"calls={self.calls} cached={self.cached_calls} requests={self.requests} retries={self.retries} "
            f"input_tokens={self.input_tokens} output_tokens={self.output_tokens} "
            f"billed_input_tokens={self.billed_input_tokens} billed_output_tokens={self.billed_output_tokens}"
        )


def _result_from_response(response: Any) -> dict[str, Any]:
    choice = response.choices[0]
    usage = response.usage
    logprobs = None
    if choice.logprobs is not None and choice.logprobs.content:
        logprobs = [
            {"token": item.token, "logprob": item.logprob, "top": [[t.token, t.logprob] for t in item.top_logprobs or []]}
            for item in choice.logprobs.content
        ]
    return {
        "text": choice.message.content or "",
        "usage": None if usage is None else {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
        "finish_reason": choice.finish_reason,
        "logprobs": logprobs,
    }


def _chat_result(stored: dict[str, Any], cached: bool) -> ChatResult:
    usage = stored["usage"] or {"input_tokens": 0, "output_tokens": 0}
    logprobs = stored.get("logprobs")
    return ChatResult(
        text=stored["text"],
        usage=Usage(int(usage["input_tokens"] or 0), int(usage["output_tokens"] or 0)),
        cached=cached,
        finish_reason=stored.get("finish_reason"),
        logprobs=None
        if logprobs is None
        else [TokenLogprob(i["token"], i["logprob"], [(t, lp) for t, lp in i["top"]]) for i in logprobs],
    )


class LLMClient:
    def __init__(
        self,
        config: LLMConfig,
        ledger: CostLedger | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if config.concurrency < 1:
            raise ValueError("llm_concurrency must be at least 1")
        if config.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.config = config
        self.ledger = ledger or CostLedger()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._client = openai.AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key or "EMPTY", max_retries=0, timeout=config.timeout_s
        )
        self._capabilities: Capabilities | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise LLMError("LLMClient.start() has not run: capabilities are unknown")
        return self._capabilities

    @property
    def model(self) -> str:
        return self.capabilities.model

    async def start(self) -> Capabilities:
        """Resolve the model and detect JSON mode and logprobs (once; cached with the responses)."""
        if self._capabilities is not None:
            return self._capabilities
        key = request_key({"capabilities-v2": self.config.base_url.rstrip("/"), "model": self.config.model})
        stored = self._cache.get(key) if self._cache else None
        if stored is not None:
            self._capabilities = Capabilities(**stored)
            return self._capabilities
        model = self.config.model or await self._first_model()
        self._capabilities = Capabilities(
            model=model,
            json_mode=await self._probe_json_mode(model),
            logprobs=await self._probe_logprobs(model),
            json_schema=await self._probe_json_schema(model),
        )
        if self._cache:
            self._cache.put(key, asdict(self._capabilities))
        return self._capabilities

    async def _first_model(self) -> str:
        page = await self._with_retries(self._client.models.list, probe=True)
        if not page.data:
            raise LLMError(f"{self.config.base_url} lists no models; set STARMAP_LLM_MODEL")
        return page.data[0].id

    async def _probe(self, request: dict[str, Any]) -> Any | None:
        """The probe's response, or None when the server rejects the request's parameters."""
        try:
            response = await self._with_retries(lambda: self._client.chat.completions.create(**request), probe=True)
        except LLMError as exc:
            if isinstance(exc.__cause__, REJECTED):
                return None
            raise
        self._record_billed(_result_from_response(response))
        return response

    async def _probe_json_mode(self, model: str) -> bool:
        response = await self._probe(
            {
                "model": model,
                "messages": [{"role": "user", "content": PROBE_JSON_MESSAGE}],
                "temperature": 0.0,
                "max_tokens": 16,
                "response_format": {"type": "json_object"},
            }
        )
        return response is not None

    async def _probe_json_schema(self, model: str) -> bool:
        response = await self._probe(
            {
                "model": model,
                "messages": [{"role": "user", "content": PROBE_SCHEMA_MESSAGE}],
                "temperature": 0.0,
                "max_tokens": 16,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "probe", "schema": PROBE_SCHEMA, "strict": True},
                },
            }
        )
        return response is not None

    async def _probe_logprobs(self, model: str) -> bool:
        response = await self._probe(
            {
                "model": model,
                "messages": [{"role": "user", "content": PROBE_LOGPROBS_MESSAGE}],
                "temperature": 0.0,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": 2,
            }
        )
        if response is None:
            return False
        logprobs = response.choices[0].logprobs
        return bool(logprobs is not None and logprobs.content and logprobs.content[0].top_logprobs)

    def _backoff(self, attempt: int, exc: Exception) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
        delay *= self._rng.uniform(0.5, 1.0)
        if isinstance(exc, openai.APIStatusError):
            try:
                retry_after = float(exc.response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = 0.0
            delay = max(delay, min(retry_after, self.config.backoff_max_s))
        return delay

    async def _with_retries(self, send: Callable[[], Awaitable[Any]], probe: bool = False) -> Any:
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                async with self._semaphore:
                    self.ledger.requests += 1
                    self.ledger.probe_requests += probe
                    return await send()
            except RETRYABLE as exc:
                if attempt == self.config.max_attempts:
                    raise LLMError(
                        f"{self.config.base_url}: gave up after {attempt} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                self.ledger.retries += 1
                await self._sleep(self._backoff(attempt, exc))
            except openai.APIError as exc:
                raise LLMError(f"{self.config.base_url}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _record_billed(self, result: dict[str, Any]) -> None:
        usage = result["usage"]
        if usage is None:
            self.ledger.calls_without_usage += 1
            return
        self.ledger.billed_input_tokens += int(usage["input_tokens"] or 0)
        self.ledger.billed_output_tokens += int(usage["output_tokens"] or 0)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        json_mode: bool = False,
        json_schema: dict[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 5,
        seed: int | None = None,
    ) -> ChatResult:
        """One chat completion. A JSON schema, JSON mode and logprobs are used only where the endpoint
        has them; a schema falls back to JSON mode, and JSON mode to the prompt's own instructions."""
        capabilities = await self.start()
        request: dict[str, Any] = {
            "model": capabilities.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if json_schema is not None and capabilities.json_schema:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json_schema, "strict": True},
            }
        elif (json_mode or json_schema is not None) and capabilities.json_mode:
            request["response_format"] = {"type": "json_object"}
        if logprobs and capabilities.logprobs:
            request["logprobs"] = True
            request["top_logprobs"] = top_logprobs
        if seed is not None:
            request["seed"] = seed
        self.ledger.calls += 1
        key = request_key(request)
        stored = self._cache.get(key) if self._cache else None
        cached = stored is not None
        if stored is None:
            response = await self._with_retries(lambda: self._client.chat.completions.create(**request))
            stored = _result_from_response(response)
            self._record_billed(stored)
            if self._cache:
                self._cache.put(key, stored)
        else:
            self.ledger.cached_calls += 1
        result = _chat_result(stored, cached)
        self.ledger.input_tokens += result.usage.input_tokens
        self.ledger.output_tokens += result.usage.output_tokens
        return result

