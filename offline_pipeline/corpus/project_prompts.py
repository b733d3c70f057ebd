"""The project's benign chat prompts: everyday requests, and look-alikes that only sound unsafe.

`offline_pipeline/data/benign_prompts.jsonl`, one prompt a line: `id`, `text`, `topic`, `lookalike`
and, for look-alikes ("How do I kill a stuck Python process?"), `looks_like`: the safety domain the
surface words suggest. Look-alikes keep a feature that fires on words rather than meaning from
passing the precision-recall filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.project_data import (
    PROJECT_LICENCE,
    ProjectDataError,
    data_file,
    read_rows,
    require,
)
from offline_pipeline.corpus.records import SAFETY_DOMAINS, Record

BENIGN_FILE = "benign_prompts.jsonl"


@dataclass(frozen=True)
class BenignPrompt:
    id: str
    text: str
    topic: str
    lookalike: bool
    looks_like: str | None


def load_benign_prompts(path: Path | None = None) -> list[BenignPrompt]:
    path = path or data_file(BENIGN_FILE)
    prompts, seen_ids, seen_texts = [], set(), set()
    for where, row in read_rows(path, ("id", "text", "topic", "lookalike", "looks_like")):
        prompt = BenignPrompt(
            id=require(row, "id", str, where),
            text=require(row, "text", str, where).strip(),
            topic=require(row, "topic", str, where),
            lookalike=row.get("lookalike"),
            looks_like=row.get("looks_like"),
        )
        if not isinstance(prompt.lookalike, bool):
            raise ProjectDataError(f"{where}: field 'lookalike' must be true or false")
        if prompt.lookalike != (prompt.looks_like is not None):
            raise ProjectDataError(f"{where}: field 'looks_like' must be set exactly when 'lookalike' is true")
        if prompt.looks_like is not None and prompt.looks_like not in SAFETY_DOMAINS:
            raise ProjectDataError(f"{where}: field 'looks_like' is {prompt.looks_like!r}, expected a safety domain")
        if prompt.id in seen_ids or prompt.text in seen_texts:
            raise ProjectDataError(f"{where}: duplicate id or text ({prompt.id!r})")
        seen_ids.add(prompt.id)
        seen_texts.add(prompt.text)
        prompts.append(prompt)
    return prompts


def benign_records(prompts: list[BenignPrompt] | None = None) -> list[Record]:
    return [
        Record(
            text=prompt.text,
            source=f"project:{BENIGN_FILE}",
            licence=PROJECT_LICENCE,
            domain="benign",
            kind="prompt",
            is_lookalike=prompt.lookalike,
            looks_like=prompt.looks_like,
            label_origin="project",
            source_label=prompt.topic,
        )
        for prompt in (load_benign_prompts() if prompts is None else prompts)
    ]
