"""Chat generation on a loaded local model: the one place where StarMap's OpenAI-compatible endpoint
runs the model.

Every generation is a job of a `GenerationQueue`: in `starmap serve` the same bounded queue as the
chat, steering and trace jobs, so that a completion never runs beside another model run (a steering
edit hooks the shared model) and a full queue answers 503 like every other route.
A manual token loop (prefill, then one token at a time with the KV cache) gives greedy decoding at
temperature 0, seeded sampling otherwise, logprobs, JSON mode and JSON-schema mode (each step keeps
only tokens that continue a valid document, checked by `JsonPrefix` / `SchemaPrefix` over the best
candidates in logit order), stop strings, and streaming; a consumer that stops reading cancels the generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.generation import GenerationQueue, Job
from app.json_constraint import JsonPrefix, SchemaPrefix
from app.live import SteeringPlan, encode_prompt
from sae_engine.models import LoadedModel

JSON_CANDIDATES = 64  # candidates checked before falling back to the whole vocabulary, in logit order
Constraint = JsonPrefix | SchemaPrefix


@dataclass
class ChatParams:
    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    json_object: bool = False
    json_schema: dict | None = None  # a schema of the subset `SchemaPrefix` supports
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    steering: SteeringPlan | None = None  # StarMap's extension: SAE-feature edits and `stop_when`


@dataclass
class TokenInfo:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    text: str
    logprobs: list[TokenInfo]


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "feature" (`stop_when` fired)
    logprobs: list[TokenInfo] | None


class _End:
    pass


class LocalChatModel:
    def __init__(self, loaded: LoadedModel, queue: GenerationQueue, aliases: Sequence[str] = ()) -> None:
        self.loaded = loaded
        self.queue = queue
        self.name = loaded.name
        self.aliases = tuple(aliases)
        tokenizer = loaded.tokenizer
        self._eos_ids = loaded.eos_ids
        self._special_ids = set(tokenizer.all_special_ids)
        self._token_text: dict[int, str] = {}
        self._by_first_char: dict[str, list[int]] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(self.loaded, messages).ids

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.loaded.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._token_text[token_id]

    def _tokens_by_first_char(self) -> dict[str, list[int]]:
        """Every ordinary token, grouped by its text's first character (decoded once, in one batch)."""
        if self._by_first_char is None:
            size = self.loaded.model.get_output_embeddings().weight.shape[0]
            missing = [i for i in range(size) if i not in self._token_text]
            texts = self.loaded.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._token_text.update(zip(missing, texts))
            groups: dict[str, list[int]] = {}
            for token_id in range(size):
                text = self._token_text[token_id]
                if text and token_id not in self._special_ids:
                    groups.setdefault(text[0], []).append(token_id)
            self._by_first_char = groups
        return self._by_first_char

    async def generate(self, params: ChatParams) -> Generation:
        """Raises `QueueFull` when the queue has no room."""
        return await self.queue.run("completion", lambda job: self._run(params, None, job))

    def stream(self, params: ChatParams) -> AsyncIterator[Delta | Generation]:
        """Text deltas as they are generated, then the `Generation` summary.

        The job is queued now, so that a full queue raises `QueueFull` before any response starts.
        """
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta | _End] = asyncio.Queue()

        def emit(delta: Delta) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

        job = self.queue.submit("completion", lambda job: self._run(params, emit, job))
        job.future.add_done_callback(lambda _: deltas.put_nowait(_End()))

        async def items() -> AsyncIterator[Delta | Generation]:
            try:
                while not isinstance(item := await deltas.get(), _End):
                    yield item
                yield await job.future
            finally:
                job.cancel()

        return items()

    def _allowed(self, state: Constraint, token_id: int) -> Constraint | None:
        if token_id in self._special_ids:
            return None
        candidate = state.copy()
        return candidate if candidate.feed_text(self.token_text(token_id)) else None

    def _choose_constrained(
        self, logits: torch.Tensor, params: ChatParams, generator: torch.Generator | None, state: Constraint
    ) -> tuple[int, Constraint]:
        order = torch.argsort(logits, descending=True)
        top = order[:JSON_CANDIDATES].tolist()
        valid = [(t, s) for t in top if (s := self._allowed(state, t)) is not None]
        if valid and params.temperature > 0:
            weights = torch.softmax(logits[[t for t, _ in valid]] / params.temperature, dim=-1)
            pick = int(torch.multinomial(weights, 1, generator=generator))
            return valid[pick]
        if valid:
            return valid[0]
        # None of the best candidates fits: search the whole vocabulary, in logit order, among the
        # tokens whose first character can come next.
        groups = self._tokens_by_first_char()
        ids = [i for char, members in groups.items() if state.copy().feed_text(char) for i in members]
        if ids:
            candidates = torch.tensor(ids)
            for token_id in candidates[torch.argsort(logits[candidates], descending=True)].tolist():
                if (s := self._allowed(state, token_id)) is not None:
                    return token_id, s
        raise RuntimeError("constrained decoding: no token of the vocabulary continues the JSON document")

    def _choose(self, logits: torch.Tensor, params: ChatParams, generator: torch.Generator | None) -> int:
        if params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_ids = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            probs = torch.zeros_like(probs).scatter(0, sorted_ids[keep], sorted_probs[keep])
        # Sampling by the exponential-race trick (argmax of p / Exp(1) noise): exact, and cheaper than multinomial.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return int(torch.argmax(probs / noise))

    def _info(self, logits: torch.Tensor, token_id: int, k: int) -> TokenInfo:
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, k) if k else None
        alternatives = [] if top is None else [(self.token_text(int(i)), float(v)) for v, i in zip(top.values, top.indices)]
        return TokenInfo(self.token_text(token_id), float(logprobs[token_id]), alternatives)

    def _run(self, params: ChatParams, emit: Callable[[Delta], None] | None, job: Job) -> Generation:
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        prompt = self.prompt_ids(params.messages)
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        state: Constraint | None = None
        if params.json_schema is not None:
            state = SchemaPrefix(params.json_schema)
        elif params.json_object:
            state = JsonPrefix()
        generated: list[int] = []
        infos: list[TokenInfo] = []
        text, emitted, pending_infos = "", 0, []
        hold = max((len(s) for s in params.stop), default=1) - 1
        finish = "length"
        n_completion = 0
        hooks = params.steering.passes(model, len(prompt)) if params.steering else None
        with torch.inference_mode(), hooks or contextlib.nullcontext():
            if job.cancelled:
                return Generation("", len(prompt), 0, "cancelled", [] if params.logprobs else None)
            ids = torch.tensor([prompt], device=self.loaded.device)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            for _ in range(params.max_tokens):
                if job.cancelled:
                    finish = "cancelled"
                    break
                logits = out.logits[0, -1].float()
                if state is not None:
                    token_id, state = self._choose_constrained(logits, params, generator, state)
                else:
                    token_id = self._choose(logits, params, generator)
                n_completion += 1
                job.tokens = n_completion
                if params.logprobs:
                    info = self._info(logits, token_id, params.top_logprobs)
                    infos.append(info)
                    pending_infos.append(info)
                if token_id in self._eos_ids:
                    finish = "stop"
                    break
                generated.append(token_id)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                stop_at = min((i for s in params.stop if (i := text.find(s)) != -1), default=-1)
                if stop_at != -1:
                    text, finish = text[:stop_at], "stop"
                    break
                if state is not None and state.complete:
                    finish = "stop"
                    break
                ready = len(text) - hold if params.stop else len(text)
                if emit and ready > emitted and not text.endswith("\ufffd"):
                    emit(Delta(text[emitted:ready], pending_infos))
                    emitted, pending_infos = ready, []
                if hooks:
                    hooks.at(len(prompt) + len(generated) - 1)
                out = model(
                    input_ids=torch.tensor([[token_id]], device=self.loaded.device),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                if hooks and hooks.stopped():
                    finish = "feature"
                    break
        if emit and (len(text) > emitted or pending_infos):
            emit(Delta(text[emitted:], pending_infos))
        return Generation(text, len(prompt), n_completion, finish, infos if params.logprobs else None)
