"""StarMap's OpenAI-compatible endpoint, served by uvicorn on 127.0.0.1, spoken to by the official
`openai` client: a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from app.generation import GenerationQueue
from app.json_constraint import JsonPrefix
from app.local_chat import LocalChatModel
from app.loopback_server import serve_on_loopback
from app.openai_api import openai_app
from offline_pipeline.explain.llm_client import LLMClient, LLMConfig
from sae_engine.models import LoadedModel, from_config, tiny_llama_config

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def generator(tokenizer):
    config = tiny_llama_config(tokenizer, num_hidden_layers=2, max_position_embeddings=2048)
    loaded = LoadedModel(from_config(config), tokenizer, MODEL, torch.device("cpu"), torch.float32)
    return LocalChatModel(loaded, GenerationQueue(16), aliases=("tiny",))


@pytest.fixture(scope="module")
def base_url(generator):
    with serve_on_loopback(openai_app(generator)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny"]


def test_chat_non_streaming_counts_usage_with_the_tokenizer(client, generator):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert response.usage.prompt_tokens == len(generator.prompt_ids(MESSAGES))
    assert 1 <= response.usage.completion_tokens <= 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 6
    # Greedy decoding is deterministic.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6)
    assert again.choices[0].message.content == choice.message.content


def test_streaming_gives_the_same_text_and_usage(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) >= 2  # really streamed, token by token
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens and usage.prompt_tokens == plain.usage.prompt_tokens


def test_sse_wire_format_ends_with_done(base_url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=12
        )
        return response.choices[0].message.content

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_json_object_mode_produces_a_json_object(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, response_format={"type": "json_object"}
    )
    text = response.choices[0].message.content
    assert text.lstrip().startswith("{")
    assert JsonPrefix().feed_text(text)  # a random model still writes valid JSON, at worst cut by max_tokens
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_json_schema_mode_writes_a_document_of_the_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "t1": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": 4, "maxItems": 4},
            "t2": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 2, "maxItems": 2},
            "ok": {"type": "boolean"},
        },
        "required": ["t1", "t2", "ok"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0.7,
        seed=5,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    # Even a random model can only write a document of the schema: only the values are its choice.
    answer = json.loads(response.choices[0].message.content)
    assert response.choices[0].finish_reason == "stop"
    assert list(answer) == ["t1", "t2", "ok"]
    assert len(answer["t1"]) == 4 and all(v in (0, 1) for v in answer["t1"])
    assert len(answer["t2"]) == 2 and all(0 <= v <= 10 for v in answer["t2"])
    assert isinstance(answer["ok"], bool)


def test_unsupported_json_schemas_are_rejected_with_the_reason(client):
    bad = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"], "additionalProperties": False}
    with pytest.raises(openai.BadRequestError, match="schema.x: unsupported type 'number'"):
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
        )


def test_logprobs_are_returned(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)


def test_bad_requests_get_4xx_with_messages(client):
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be less than or equal to 2") as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert info.value.body["param"] == "temperature" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="'gpt-nothing' is not served here"):
        client.chat.completions.create(model="gpt-nothing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="messages: List should have at least 1 item"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be greater than or equal to 1"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)


def test_the_llm_client_detects_json_mode_and_logprobs_on_starmap(base_url):
    async def scenario():
        async with LLMClient(LLMConfig(base_url=base_url + "/v1")) as llm:
            result = await llm.chat(MESSAGES, max_tokens=5, json_mode=True, logprobs=True)
            return llm.capabilities, result

    capabilities, result = asyncio.run(scenario())
    assert capabilities.model == MODEL and capabilities.json_mode and capabilities.logprobs and capabilities.json_schema
    assert result.text.lstrip().startswith("{") and result.usage.output_tokens <= 5


def test_concurrent_requests_are_served_one_after_another(base_url):
    async def scenario():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(4)))

    responses = asyncio.run(scenario())
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert all(r.status_code == 200 for r in responses) and len(texts) == 1
