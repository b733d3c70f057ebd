"""Chat records: each prompt rendered with the model's chat template, followed by the model's own answer.

Safety features fire on responses as well as prompts, so the corpus keeps what the model itself says.
Answers are generated once (greedy, batched with left padding, under the model's default system prompt, as
the app sends a new chat) and cached in a SQLite file under `<data_dir>/cache/answers/`, keyed by a hash of
(model name, prompt, generation settings). With each answer the cache keeps the model's probability of a
refusal opening at the first answer token (`sae_engine.refusal`). Every batch is committed as soon as it is
generated, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from offline_pipeline.corpus.records import Record
from sae_engine.inference import PositionClock
from sae_engine.models import LoadedModel
from sae_engine.refusal import FIRST_TOKEN_TEXTS, first_token_ids, label, refusal_probability
from sae_engine.steered_generation import greedy, until_eos, user_turns


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 48
    batch_size: int = 16

    def cache_fields(self) -> dict:
        # Greedy decoding: the batch size changes the speed, not the answer.
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "refusal_tokens": list(FIRST_TOKEN_TEXTS)}


DEFAULT_GENERATION = GenerationSettings()
# Enough tokens to read a refusal's opening ("I'm sorry, but I can't" is 7 Qwen tokens).
OPENING_GENERATION = GenerationSettings(max_new_tokens=8, batch_size=32)


@dataclass(frozen=True)
class Answer:
    text: str
    refusal_p: float | None


def answers_path(data_dir: Path) -> Path:
    return Path(data_dir) / "cache" / "answers" / "answers.sqlite"


def answer_key(model_name: str, prompt: str, settings: GenerationSettings) -> str:
    payload = json.dumps({"model": model_name, "prompt": prompt, **settings.cache_fields()}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers on disk; `generated` counts the prompts this instance had to send to the model."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(self.path)
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, prompt TEXT NOT NULL,"
            " settings TEXT NOT NULL, answer TEXT NOT NULL, refusal_p REAL)"
        )
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(answers)")}
        if "refusal_p" not in columns:  # a cache written before refusal probabilities were kept
            self.connection.execute("ALTER TABLE answers ADD COLUMN refusal_p REAL")
        self.connection.commit()
        self.generated = 0

    def get(self, keys: list[str]) -> dict[str, Answer]:
        found: dict[str, Answer] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.connection.execute(f"SELECT key, answer, refusal_p FROM answers WHERE key IN ({marks})", chunk)
            found.update({key: Answer(answer, p) for key, answer, p in rows})
        return found

    def put(self, rows: list[tuple[str, str, str, str, str, float | None]]) -> None:
        self.connection.executemany(
            "INSERT OR REPLACE INTO answers (key, model, prompt, settings, answer, refusal_p) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
        self.connection.commit()

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.connection.close()


def _generate(loaded: LoadedModel, prompts: list[str], max_new_tokens: int) -> list[Answer]:
    """Greedy answers to user turns (the app's encoding), with each first token's refusal probability; the
    template and system prompt the batch shares run once."""
    batch = user_turns(loaded, prompts)
    tokens, first = greedy(loaded, batch, max_new_tokens, PositionClock())
    probabilities = refusal_probability(first, first_token_ids(loaded.tokenizer)).tolist()
    texts = [loaded.tokenizer.decode(until_eos(row, loaded.eos_ids), skip_special_tokens=True) for row in tokens.tolist()]
    return [Answer(text.strip(), p) for text, p in zip(texts, probabilities)]


def generate_answers(
    loaded: LoadedModel, prompts: list[str], cache: AnswerCache, settings: GenerationSettings = DEFAULT_GENERATION
) -> list[Answer]:
    """The model's answer to each prompt, from the cache where possible."""
    keys = [answer_key(loaded.name, prompt, settings) for prompt in prompts]
    known = cache.get(sorted(set(keys)))
    missing = sorted(
        {key: prompt for key, prompt in zip(keys, prompts) if key not in known}.items(), key=lambda kv: len(kv[1])
    )
    settings_json = json.dumps(settings.cache_fields(), sort_keys=True)
    with tqdm(total=len(missing), desc="answers", unit="prompt", disable=not missing) as bar:
        for start in range(0, len(missing), settings.batch_size):
            batch = missing[start : start + settings.batch_size]
            answers = _generate(loaded, [prompt for _, prompt in batch], settings.max_new_tokens)
            cache.put(
                [(key, loaded.name, prompt, settings_json, a.text, a.refusal_p) for (key, prompt), a in zip(batch, answers)]
            )
            known.update({key: answer for (key, _), answer in zip(batch, answers)})
            cache.generated += len(batch)
            bar.update(len(batch))
    return [known[key] for key in keys]


def refusal_labels(
    records: list[Record], loaded: LoadedModel, cache: AnswerCache, settings: GenerationSettings = OPENING_GENERATION
) -> list[Record]:
    """The records, each prompt labelled refused or not from the opening of the model's own answer."""
    prompts = [r for r in records if r.kind == "prompt"]
    answers = dict(zip((r.record_id for r in prompts), generate_answers(loaded, [r.text for r in prompts], cache, settings)))
    out = []
    for record in records:
        answer = answers.get(record.record_id)
        if answer is None:
            out.append(record)
            continue
        verdict = label(answer.text, answer.refusal_p)
        out.append(replace(record, refused=verdict.refused, refusal_p=answer.refusal_p, opening=answer.text))
    return out


def chat_records(
    records: list[Record], loaded: LoadedModel, cache: AnswerCache, settings: GenerationSettings = DEFAULT_GENERATION
) -> list[Record]:
    """One chat record per prompt record: the prompt (a user turn) with the model's answer, same labels and split."""
    prompts = [record for record in records if record.kind == "prompt"]
    answers = generate_answers(loaded, [record.text for record in prompts], cache, settings)
    return [
        replace(record, kind="chat", record_id="", prompt_id=record.record_id, answer=answer.text)
        for record, answer in zip(prompts, answers)
    ]


def opening_records(records: list[Record], n: int) -> list[Record]:
    """Chats of up to `n` refusal-labelled prompts (half refused, half answered, in id order), each with the
    opening of the model's own answer as the answer: where the refusal features are found. The model's refusal
    shows in what it says, not in the prompt's words (on the 0.5B no feature's maximum over a prompt's words
    separates the prompts it refuses from those it answers), so refusal features are measured on the opening."""
    labelled = sorted((r for r in records if r.kind == "prompt" and r.refused is not None and r.opening), key=lambda r: r.record_id)
    refused = [r for r in labelled if r.refused][: n // 2]
    answered = [r for r in labelled if not r.refused][: n // 2]
    return [
        replace(record, kind="opening", record_id="", prompt_id=record.record_id, answer=record.opening)
        for record in refused + answered
    ]
