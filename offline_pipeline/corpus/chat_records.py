"""Chat records: each prompt rendered with the model's chat template, followed by the model's own answer.

Safety features fire on responses as well as prompts, so the corpus keeps what the model itself says.
Answers are generated once (greedy, batched with left padding) and cached in a SQLite file under
`<data_dir>/cache/answers/`, keyed by a hash of (model name, prompt, generation settings). Every batch
is committed as soon as it is generated, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from offline_pipeline.corpus.records import Record
from sae_engine.models import LoadedModel


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 48
    batch_size: int = 16

    def cache_fields(self) -> dict:
        # Greedy decoding: the batch size changes the speed, not the answer.
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}


DEFAULT_GENERATION = GenerationSettings()


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
            " settings TEXT NOT NULL, answer TEXT NOT NULL)"
        )
        self.connection.commit()
        self.generated = 0

    def get(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.connection.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk))
        return found

    def put(self, rows: list[tuple[str, str, str, str, str]]) -> None:
        self.connection.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", rows)
        self.connection.commit()

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.connection.close()


def render_prompt(tokenizer, prompt: str) -> str:
    """The user turn in the model's chat template, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def _generate(loaded: LoadedModel, rendered: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = loaded.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    finally:
        tokenizer.padding_side = side
    output = loaded.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(
    loaded: LoadedModel, prompts: list[str], cache: AnswerCache, settings: GenerationSettings = DEFAULT_GENERATION
) -> list[str]:
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
            rendered = [render_prompt(loaded.tokenizer, prompt) for _, prompt in batch]
            answers = _generate(loaded, rendered, settings.max_new_tokens)
            cache.put(
                [(key, loaded.name, prompt, settings_json, answer) for (key, prompt), answer in zip(batch, answers)]
            )
            known.update({key: answer for (key, _), answer in zip(batch, answers)})
            cache.generated += len(batch)
            bar.update(len(batch))
    return [known[key] for key in keys]


def chat_records(
    records: list[Record], loaded: LoadedModel, cache: AnswerCache, settings: GenerationSettings = DEFAULT_GENERATION
) -> list[Record]:
    """One chat record per prompt record: template-rendered prompt plus the model's answer, same labels and split."""
    prompts = [record for record in records if record.kind == "prompt"]
    answers = generate_answers(loaded, [record.text for record in prompts], cache, settings)
    return [
        replace(
            record,
            text=render_prompt(loaded.tokenizer, record.text) + answer,
            kind="chat",
            record_id="",
            prompt_id=record.record_id,
            answer=answer,
        )
        for record, answer in zip(prompts, answers)
    ]
