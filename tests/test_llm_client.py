"""The OpenAI-compatible LLM client against a real scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from app.loopback_server import serve_on_loopback
from offline_pipeline.explain.llm_client import LLMClient, LLMConfig, LLMError
from tests.scripted_openai_server import ScriptedServer


def run(coro):
    return asyncio.run(coro)


def config(base_url: str, **overrides) -> LLMConfig:
    values = {"base_url": base_url + "/v1", "model": "scripted-model", "backoff_s": 0.001, "backoff_max_s": 0.01}
    return LLMConfig(**{**values, **overrides})


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_retries_injected_429_and_500_then_succeeds():
    server = ScriptedServer(respond=lambda body: "fine answer")
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url)) as client:
                server.failures = [429, 500, 503]
                result = await client.chat(ask("hello"))
                return client, result

        client, result = run(scenario())
    assert result.text == "fine answer"
    assert len(server.chat_requests()) == 4  # three failures, then the answer
    assert client.ledger.retries == 3
    assert client.ledger.calls == 1


def test_gives_up_after_bounded_attempts_and_does_not_retry_a_400():
    server = ScriptedServer()
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url, max_attempts=3)) as client:
                server.failures = [500] * 10
                with pytest.raises(LLMError, match="gave up after 3 attempts"):
                    await client.chat(ask("a"))
                sent = len(server.chat_requests())
                server.failures = [400]
                with pytest.raises(LLMError, match="BadRequestError"):
                    await client.chat(ask("b"))
                return sent

        sent_before_400 = run(scenario())
    assert sent_before_400 == 3
    assert len(server.chat_requests()) == 4  # the 400 was sent once, not retried


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after():
    server = ScriptedServer()
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    with serve_on_loopback(server.app) as url:

        async def scenario():
            cfg = config(url, backoff_s=0.1, backoff_max_s=10.0, max_attempts=5)
            async with LLMClient(cfg, rng=random.Random(0), sleep=record_sleep) as client:
                server.failures = [500, 500, 500]
                await client.chat(ask("x"))
                server.failures, server.retry_after = [429], "2.5"
                await client.chat(ask("y"))

        run(scenario())
    assert len(delays) == 4
    for attempt, delay in enumerate(delays[:3]):
        nominal = 0.1 * 2**attempt
        assert 0.5 * nominal <= delay <= nominal
    assert delays[3] == pytest.approx(2.5)


def test_cache_makes_a_second_run_send_zero_requests(tmp_path):
    server = ScriptedServer(respond=lambda body: f"answer to {body['messages'][-1]['content']}")
    with serve_on_loopback(server.app) as url:

        async def one_run():
            async with LLMClient(config(url, model=None, cache_dir=tmp_path / "llm")) as client:
                results = [await client.chat(ask(q)) for q in ("one", "two words", "one")]
                return client.ledger, results

        first_ledger, first = run(one_run())
        sent_after_first = len(server.requests)
        second_ledger, second = run(one_run())
    assert [r.text for r in first] == ["answer to one", "answer to two words", "answer to one"]
    assert [r.text for r in second] == [r.text for r in first]
    assert first_ledger.cached_calls == 1 and not first[0].cached and first[2].cached
    assert len(server.requests) == sent_after_first  # the second run (probes included) sent nothing
    assert second_ledger.requests == 0 and second_ledger.cached_calls == 3
    # The recorded cost of the work is the same; nothing was billed the second time.
    assert (second_ledger.input_tokens, second_ledger.output_tokens) == (first_ledger.input_tokens, first_ledger.output_tokens)
    assert second_ledger.billed_input_tokens == 0 and second_ledger.billed_output_tokens == 0


def test_cache_key_covers_sampling_and_format(tmp_path):
    server = ScriptedServer(respond=lambda body: "{}")
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url, cache_dir=tmp_path)) as client:
                await client.chat(ask("q"), temperature=0.0)
                await client.chat(ask("q"), temperature=0.7)
                await client.chat(ask("q"), json_mode=True)
                await client.chat(ask("q"), max_tokens=7)
                await client.chat(ask("q"), temperature=0.0)

        run(scenario())
    assert len(server.chat_requests()) == 4


def test_usage_of_every_call_is_recorded():
    server = ScriptedServer(respond=lambda body: "three word answer")
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url)) as client:
                results = [await client.chat(ask("a b c d")) for _ in range(2)]
                results.append(await client.chat([{"role": "system", "content": "s t"}, *ask("u")]))
                return client.ledger, results

        ledger, results = run(scenario())
    assert [(r.usage.input_tokens, r.usage.output_tokens) for r in results] == [(4, 3), (4, 3), (3, 3)]
    assert (ledger.input_tokens, ledger.output_tokens) == (11, 9)
    # The server's own count includes the two start-up probes.
    assert (ledger.billed_input_tokens, ledger.billed_output_tokens) == (server.prompt_tokens, server.completion_tokens)


def test_json_mode_is_detected_and_used():
    server = ScriptedServer(respond=lambda body: '{"t1": [0, 1]}', logprobs=True)
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url)) as client:
                result = await client.chat(ask("give json"), json_mode=True, logprobs=True)
                return client.capabilities, result

        capabilities, result = run(scenario())
    assert capabilities.json_mode and capabilities.logprobs
    request = server.chat_requests()[-1]
    assert request["response_format"] == {"type": "json_object"}
    assert request["logprobs"] is True and request["top_logprobs"] == 5
    assert json.loads(result.text) == {"t1": [0, 1]}
    assert "".join(t.token for t in result.logprobs) == result.text


def test_server_without_json_mode_or_logprobs_falls_back_to_plain_requests():
    server = ScriptedServer(respond=lambda body: '{"t1": [1]}', json_mode=False, logprobs=False)
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url)) as client:
                result = await client.chat(ask("give json"), json_mode=True, logprobs=True)
                return client.capabilities, result

        capabilities, result = run(scenario())
    assert not capabilities.json_mode and not capabilities.logprobs
    request = server.chat_requests()[-1]
    assert "response_format" not in request and "logprobs" not in request
    assert result.text == '{"t1": [1]}' and result.logprobs is None


def test_json_schema_is_used_where_supported_and_falls_back_to_json_mode():
    schema = {"type": "object", "properties": {"t1": {"type": "integer", "minimum": 0, "maximum": 1}}}

    def ask_with_schema(server: ScriptedServer):
        with serve_on_loopback(server.app) as url:

            async def scenario():
                async with LLMClient(config(url)) as client:
                    await client.chat(ask("q"), json_schema=schema)
                    return client.capabilities

            return run(scenario()), server.chat_requests()[-1]

    capabilities, request = ask_with_schema(ScriptedServer(respond=lambda body: '{"t1": 1}', json_schema=True))
    assert capabilities.json_schema
    assert request["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    capabilities, request = ask_with_schema(ScriptedServer(respond=lambda body: '{"t1": 1}', json_schema=False))
    assert not capabilities.json_schema and capabilities.json_mode
    assert request["response_format"] == {"type": "json_object"}


def test_model_defaults_to_the_first_listed_one():
    server = ScriptedServer(model="served-model")
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url, model=None)) as client:
                await client.chat(ask("hi"))
                return client.model

        assert run(scenario()) == "served-model"
    assert server.chat_requests()[-1]["model"] == "served-model"


def test_concurrency_is_capped():
    server = ScriptedServer(delay_s=0.05)
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(config(url, concurrency=2)) as client:
                await asyncio.gather(*(client.chat(ask(f"q{i}")) for i in range(8)))

        run(scenario())
    assert server.max_in_flight == 2


def test_connection_errors_are_retried_then_reported():
    async def scenario():
        # Nothing listens on port 9 of 127.0.0.1 (the discard port, unused here).
        cfg = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", max_attempts=2, backoff_s=0.001, timeout_s=2)
        client = LLMClient(cfg)
        try:
            with pytest.raises(LLMError, match="gave up after 2 attempts: APIConnectionError"):
                await client.start()
        finally:
            await client.close()
        return client.ledger

    ledger = run(scenario())
    assert ledger.requests == 2 and ledger.retries == 1
