"""Load and cancellation on a real `starmap serve` process (tiny model, loopback, httpx async).

- 20 concurrent streamed chats (greedy), while steering requests (whose edits hook the model) and
  OpenAI-compatible completions share the queue with them: every request completes or is refused
  with 503 + Retry-After by the bounded queue; nothing errors; every completed stream equals the same prompt
  generated alone (tokens and overlay), as does every completion and steering answer; the server's
  RSS comes back near its baseline.
- A client that closes its stream stops its generation within 2 tokens (the server's own counter in
  /healthz), a client that leaves while queued costs no generation, and the queue moves on.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from fixtures_db import TinyWorld, tiny_world  # noqa: F401
from hardening_support import ServerProcess, copy_database, serve
from sse_support import sse_events, sse_events_async

N_CLIENTS = 20
QUEUE_SIZE = 8
NEW_TOKENS = 24
N_COMPLETIONS = 3
N_STEER = 2
COMPLETION_TOKENS = 64
TOPICS = ["bridges", "rivers", "owls", "volcanoes", "bread", "chess", "glaciers", "violins", "comets", "tea",
          "lighthouses", "bees", "deserts", "trains", "coral", "maps", "clocks", "wolves", "paper", "salt"]


@pytest.fixture(scope="module")
def server(tiny_world: TinyWorld, data_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: F811
    folder = tmp_path_factory.mktemp("load")
    database = copy_database(tiny_world, folder)
    with serve(tiny_world, database, data_dir, folder / "server.log", "--queue-size", str(QUEUE_SIZE),
               "--max-new-tokens", "4000") as process:
        yield process


@dataclass
class Outcome:
    status: int
    seconds: float
    events: list[tuple[str, dict]] = field(default_factory=list)
    retry_after: str | None = None
    body: str = ""

    def stream(self) -> list[tuple[str, dict]]:
        """The generation itself: prompt, tokens and the final summary (not the queue position)."""
        out = []
        for name, data in self.events:
            if name == "queued":
                continue
            if name == "done":
                data = {k: v for k, v in data.items() if k != "ms_per_token"}
            out.append((name, data))
        return out


def chat_body(topic: str, max_new_tokens: int = NEW_TOKENS) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me three facts about {topic}."}],
            "max_new_tokens": max_new_tokens, "temperature": 0}


async def chat(client: httpx.AsyncClient, topic: str) -> Outcome:
    started = time.perf_counter()
    async with client.stream("POST", "/api/chat", json=chat_body(topic)) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode()
            return Outcome(response.status_code, time.perf_counter() - started, retry_after=response.headers.get("retry-after"),
                           body=body)
        events = [item async for item in sse_events_async(response)]
    return Outcome(200, time.perf_counter() - started, events)


def completion_body(model: str, topic: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"Write about {topic}."}],
            "max_tokens": COMPLETION_TOKENS, "temperature": 0}


async def complete(client: httpx.AsyncClient, model: str, topic: str) -> dict | int:
    response = await client.post("/v1/chat/completions", json=completion_body(model, topic))
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1 and "queue is full" in response.json()["error"]["message"]
        return 503
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


async def steer(client: httpx.AsyncClient, feature: str, topic: str) -> dict | int:
    body = {**chat_body(topic), "interventions": [{"feature": feature, "mode": "clamp", "value": 40}]}
    response = await client.post("/api/steer", json=body)
    if response.status_code == 503:
        return 503
    assert response.status_code == 200, response.text
    return {run: response.json()[run]["text"] for run in ("default", "steered")}


async def until_queued(client: httpx.AsyncClient, jobs: int, timeout: float = 60) -> None:
    """Wait until the server holds `jobs` jobs (waiting or running), or has already finished a steering job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = (await client.get("/healthz")).json()["queue"]
        held = queue["waiting"] + (queue["running"] is not None)
        if held >= jobs or any(job["kind"] == "steer" for job in queue["recent"]):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the server never held {jobs} jobs")


def assert_same_stream(burst: Outcome, alone: Outcome, topic: str) -> None:
    got, expected = burst.stream(), alone.stream()
    assert [name for name, _ in got] == [name for name, _ in expected], topic
    for (name, data), (_, reference) in zip(got, expected):
        if name == "token":
            assert data["id"] == reference["id"] and data["i"] == reference["i"], (topic, data, reference)
            assert [fid for fid, _ in data["top"]] == [fid for fid, _ in reference["top"]], (topic, data["i"])
            assert [v for _, v in data["top"]] == pytest.approx([v for _, v in reference["top"]], abs=2e-3)
        elif name == "prompt":
            assert [t["id"] for t in data["tokens"]] == [t["id"] for t in reference["tokens"]], topic
        elif name == "done":
            assert data["text"] == reference["text"] and data["n_tokens"] == reference["n_tokens"], topic


def rss_mb(server: ServerProcess) -> float:
    return psutil.Process(server.pid).memory_info().rss / 2**20


def test_twenty_concurrent_streams(server: ServerProcess, tiny_world: TinyWorld) -> None:  # noqa: F811
    model = httpx.get(f"{server.url}/healthz").json()["model"]
    feature = tiny_world.safety[0]

    async def scenario() -> tuple[list[Outcome], list[dict], list, list[Outcome], list[dict], list, dict]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as client:
            # Warm-up: the first requests allocate the model's working memory; the baseline is taken after.
            for topic in TOPICS[:2]:
                assert (await chat(client, topic)).status == 200
            await complete(client, model, TOPICS[0])
            figures = {"rss_baseline_mb": rss_mb(server)}
            started = time.perf_counter()
            # Steering is queued (and seen queued) first, so that its edits hook the model while the completions
            # and chats arrive; otherwise the chat burst can fill the queue before any steering request lands.
            steering = [asyncio.create_task(steer(client, feature, topic)) for topic in TOPICS[:N_STEER]]
            await until_queued(client, N_STEER)
            burst = await asyncio.wait_for(asyncio.gather(
                *steering,
                *(complete(client, model, topic) for topic in TOPICS[:N_COMPLETIONS]),
                *(chat(client, topic) for topic in TOPICS[:N_CLIENTS]),
            ), timeout=300)
            figures["burst_s"] = time.perf_counter() - started
            steers = list(burst[:N_STEER])
            completions = list(burst[N_STEER:N_STEER + N_COMPLETIONS])
            chats = list(burst[N_STEER + N_COMPLETIONS:])
            figures["rss_peak_after_burst_mb"] = rss_mb(server)
            alone_chats = [await chat(client, topic) if outcome.status == 200 else None
                           for topic, outcome in zip(TOPICS, chats)]
            alone_completions = [await complete(client, model, topic) for topic in TOPICS[:N_COMPLETIONS]]
            alone_steers = [await steer(client, feature, topic) for topic in TOPICS[:N_STEER]]
            health = (await client.get("/healthz")).json()
            figures["queue_after"] = health["queue"]
            return chats, completions, steers, alone_chats, alone_completions, alone_steers, figures

    chats, completions, steers, alone_chats, alone_completions, alone_steers, figures = asyncio.run(scenario())

    completed = [o for o in chats if o.status == 200]
    refused = [o for o in chats if o.status == 503]
    assert len(completed) + len(refused) == N_CLIENTS, [(o.status, o.body) for o in chats]
    accepted = len(completed) + sum(burst != 503 for burst in steers + completions)
    assert accepted >= QUEUE_SIZE, "the queue refused requests it had room for"
    assert refused, f"{N_CLIENTS} simultaneous requests never filled a queue of {QUEUE_SIZE}"
    for outcome in refused:
        assert int(outcome.retry_after) >= 1 and "queue is full" in outcome.body
    for topic, outcome, alone in zip(TOPICS, chats, alone_chats):
        if outcome.status == 200:
            names = [name for name, _ in outcome.events]
            assert "error" not in names and names[-1] == "done", (topic, names)
            assert_same_stream(outcome, alone, topic)
    for topic, burst, alone in zip(TOPICS, completions, alone_completions):
        assert burst == 503 or burst["message"]["content"] == alone["message"]["content"], topic
    for topic, burst, alone in zip(TOPICS, steers, alone_steers):
        assert burst == 503 or burst == alone, topic
    assert any(burst != 503 for burst in steers), "no steering request ran beside the completions"
    queue = figures["queue_after"]
    assert queue["waiting"] == 0 and queue["running"] is None

    figures["rss_after_mb"] = rss_mb(server)
    latencies = sorted(o.seconds for o in completed)
    print(f"\nload: {len(completed)} completed, {len(refused)} refused with 503 (Retry-After "
          f"{sorted({int(o.retry_after) for o in refused})} s), {N_COMPLETIONS} /v1 completions and {N_STEER} steering requests beside them; "
          f"latency p50 {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s; burst {figures['burst_s']:.1f} s; "
          f"RSS baseline {figures['rss_baseline_mb']:.0f} MiB, after the burst {figures['rss_peak_after_burst_mb']:.0f} MiB, "
          f"after {figures['rss_after_mb']:.0f} MiB")
    assert figures["rss_after_mb"] - figures["rss_baseline_mb"] < 64, figures


def recent_chats(client: httpx.Client, after: int) -> dict[int, dict]:
    queue = client.get("/healthz").json()["queue"]
    return {job["id"]: job for job in queue["recent"] if job["kind"] == "chat" and job["id"] > after}


def test_closed_streams_stop_generating_and_the_queue_moves_on(server: ServerProcess) -> None:
    long = {**chat_body("rivers", 4000), "temperature": 1.0}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        before = max([0, *recent_chats(client, 0)])
        with client.stream("POST", "/api/chat", json=long) as running:
            running_events = sse_events(running)
            tokens = 0
            for name, _ in running_events:
                tokens += name == "token"
                if tokens == 5:
                    break
            with client.stream("POST", "/api/chat", json=long) as waiting:
                assert next(sse_events(waiting)) == ("queued", {"position": 1})
            # The waiting client left; now the running one leaves too.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = recent_chats(client, before)
            if len(jobs) == 2 and all(job["status"] == "cancelled" for job in jobs.values()):
                break
            time.sleep(0.05)
        first, second = (jobs[i] for i in sorted(jobs))
        assert first["status"] == second["status"] == "cancelled", jobs
        after_close = first["tokens"] - first["tokens_at_cancel"]
        assert 5 <= first["tokens_at_cancel"] < 4000 and after_close <= 2, first
        assert second["tokens"] == 0 and second["tokens_at_cancel"] == 0, "a job whose client left while queued ran"

        with client.stream("POST", "/api/chat", json=chat_body("owls", 8)) as following:
            names = [name for name, _ in sse_events(following)]
        assert names[-1] == "done" and names.count("token") == 8
        print(f"\ncancellation: closed after {first['tokens_at_cancel']} tokens, {after_close} more generated; "
              f"the queued job generated {second['tokens']}; the next request was served")
