"""Generation on the one loaded model: a bounded queue with one worker, and the token loop.

Every model run (chat, steering, trace) is a `Job` in one `asyncio.Queue(maxsize=N)`; a full queue
answers 503 with Retry-After. The worker runs one job at a time in a dedicated thread. A job
emits Server-Sent Events through a thread-safe callback and checks its cancel flag before every
model step, so a closed browser tab stops its generation after at most one more step.

`generate` is token-by-token decoding with a KV cache inside a `LayerTap`: each step feeds one
token and hands back that token's activations at every hooked layer, which is all the overlay
needs (one batched SAE encode per step).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from sae_engine.inference import LayerTap, PositionClock


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the generation queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job's client went away."""


def sse(event: str, payload: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


@dataclass
class Job:
    id: int
    kind: str
    work: Callable[[Job], Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    status: str = "queued"
    tokens: int = 0
    tokens_at_cancel: int | None = None
    created: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)
    # How an emitted event is queued for the client: an SSE string of JSON (the API), or, for a page whose
    # route renders HTML, the (event, payload) pair itself.
    encode: Callable[[str, Any], Any] = sse

    def __post_init__(self) -> None:
        self.future: asyncio.Future = self.loop.create_future()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        if not self._cancel.is_set() and self.status in ("queued", "running"):
            self.tokens_at_cancel = self.tokens
        self._cancel.set()

    def check(self) -> None:
        """Raise `Cancelled` when the client went away (called from the worker thread)."""
        if self._cancel.is_set():
            raise Cancelled

    def emit(self, event: str, payload: Any) -> None:
        """Send an SSE event to the client (thread-safe; encoded here, in the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, self.encode(event, payload))

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "tokens": self.tokens,
                "tokens_at_cancel": self.tokens_at_cancel}


class GenerationQueue:
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue_size must be at least 1")
        self.maxsize = maxsize
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="starmap-model")
        self._ids = itertools.count(1)
        self.running: Job | None = None
        self.recent: deque[Job] = deque(maxlen=32)
        self._durations: deque[float] = deque(maxlen=16)

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.maxsize)
        self._worker = asyncio.create_task(self._run_forever(), name="starmap-generation-worker")

    async def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def retry_after(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 5.0
        return max(1, round(typical * (self.waiting + 1)))

    def submit(self, kind: str, work: Callable[[Job], Any], encode: Callable[[str, Any], Any] = sse) -> Job:
        if self._queue is None:
            raise RuntimeError("the generation queue is not started")
        job = Job(next(self._ids), kind, work, asyncio.get_running_loop(), encode=encode)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(self.retry_after()) from None
        self.recent.append(job)
        return job

    async def run(self, kind: str, work: Callable[[Job], Any]) -> Any:
        """Submit a job and wait for its result; cancelling the caller cancels the job."""
        job = self.submit(kind, work)
        try:
            return await asyncio.shield(job.future)
        finally:
            job.cancel()

    async def _run_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.cancelled:
                job.status = "cancelled"
                job.future.cancel()
                job.events.put_nowait(None)
                continue
            job.status = "running"
            self.running = job
            started = time.monotonic()
            try:
                result = await loop.run_in_executor(self._executor, job.work, job)
            except Cancelled:
                job.status = "cancelled"
                job.future.cancel()
            except Exception as error:  # noqa: BLE001 - handed to the waiting request, which reports it
                job.status = "failed"
                job.future.set_exception(error)
                job.future.exception()  # marks it retrieved: a client that left must not log a warning
            else:
                job.status = "done"
                job.future.set_result(result)
            finally:
                self._durations.append(time.monotonic() - started)
                self.running = None
                job.events.put_nowait(None)

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.maxsize,
            "waiting": self.waiting,
            "running": self.running.summary() if self.running else None,
            "recent": [job.summary() for job in reversed(self.recent) if job.status not in ("queued", "running")][:8],
        }


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Step:
    """One generated token (None for the prompt pass) and the activations of the tokens just fed."""

    token_id: int | None
    acts: Tensor  # (L, T, d_in)


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: nn.Module,
    tap: LayerTap,
    clock: PositionClock,
    prompt_ids: list[int],
    sampling: Sampling,
    eos_ids: set[int],
    check: Callable[[], None] = lambda: None,
) -> Iterator[Step]:
    """Yield the prompt's activations, then each new token with its own activations.

    Every new token is fed through the model (the last one and EOS too), so each has an overlay.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    cache = DynamicCache()
    clock.prompt_len, clock.offset = len(prompt_ids), 0
    check()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    yield Step(None, tap.stacked())
    position = len(prompt_ids)
    for _ in range(sampling.max_new_tokens):
        token = choose(out.logits[0, -1].cpu() if sampling.temperature > 0 else out.logits[0, -1], sampling, generator)
        check()
        clock.offset = position
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
        position += 1
        yield Step(token, tap.stacked())
        if token in eos_ids:
            return
