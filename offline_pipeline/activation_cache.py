"""The activation cache of a pipeline run: every corpus record's tokens and hooked activations, kept once.

One model pass over the corpus feeds everything after it (the config sweep, SAE training, feature
statistics, the filter and the evaluation), so the model never runs twice over the same text.

Layout of the `activations` stage folder:

- `records.jsonl`: one line per cached record (corpus fields + `index`), in cache order;
- `tokens.npy` (int32, all records' token ids end to end) and `offsets.npy` (int64, n_records + 1):
  record i owns tokens `offsets[i]:offsets[i+1]`; a record's first token is never content (an opener
  token, or the chat template's first token);
- `content.npy` (bool per token): the token carries a user's or the answer's words (`sae_engine.chat`);
  template and system-prompt tokens are False. Statistics, filter, explanations and evaluation count
  content tokens only, as the app does;
- `answer_start.npy` (int64 per record): the position where the model's answer begins (the end of the
  record for records without one); the token before it is the last prompt token;
- `acts/<hook name>.npy`: (n_tokens, d_model) activations as the bit patterns of bfloat16 stored
  as int16 (numpy has no bfloat16; the model computes in bf16 on CPU, so this is lossless there
  and half the size of fp32); opened memory-mapped;
- `norms/<hook name>.npy`: float32 L2 norm per token, for the outlier mask.

Records are run in batches of similar length (right padding, attention mask), longest first, and
the forward pass stops after the deepest hooked layer.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_engine.chat import EncodedChat
from sae_engine.hooks import capture_activations, capture_after_prefix, prefix_cache
from sae_engine.models import LoadedModel


def hook_file(folder: Path, kind: str, hook: str) -> Path:
    return folder / kind / f"{hook}.npy"


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Record indices grouped longest first into batches of at most `batch_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


# A prefix shared by this many tokens' worth of records is run once (the chat template and system prompt).
MIN_SHARED_PREFIX = 8


def shared_prefixes(encoded: Sequence[EncodedChat]) -> dict[tuple[int, ...], list[int]]:
    """Records grouped by their tokens before the first content token, for the groups worth running once:
    at least two records, and a prefix of at least `MIN_SHARED_PREFIX` tokens."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, e in enumerate(encoded):
        first = e.content.index(True) if True in e.content else len(e.ids)
        if first >= MIN_SHARED_PREFIX and first < len(e.ids):
            groups[tuple(e.ids[:first])].append(index)
    return {prefix: members for prefix, members in groups.items() if len(members) > 1}


def phases(records: Sequence[int], apart: Sequence[bool]) -> list[list[int]]:
    """The records not marked apart, then those marked (empty phases left out)."""
    return [phase for phase in ([i for i in records if not apart[i]], [i for i in records if apart[i]]) if phase]


class _Writer:
    """The cache's memory-mapped activation and norm files, filled batch by batch."""

    def __init__(self, folder: Path, hooks: Sequence[str], n_tokens: int, d_model: int, offsets: np.ndarray) -> None:
        self.offsets = offsets
        self.acts, self.norms = {}, {}
        for hook in hooks:
            hook_file(folder, "acts", hook).parent.mkdir(parents=True, exist_ok=True)
            hook_file(folder, "norms", hook).parent.mkdir(parents=True, exist_ok=True)
            self.acts[hook] = np.lib.format.open_memmap(hook_file(folder, "acts", hook), "w+", np.int16, (n_tokens, d_model))
            self.norms[hook] = np.lib.format.open_memmap(hook_file(folder, "norms", hook), "w+", np.float32, (n_tokens,))

    def write(self, store: dict[str, torch.Tensor], rows: Sequence[tuple[int, int, int, int]]) -> None:
        """rows: (batch row, record, first position of the record the row holds, how many positions)."""
        for hook, tensor in store.items():
            tensor = tensor.to("cpu", torch.bfloat16)
            row_norms = tensor.float().norm(dim=-1)
            bits = tensor.view(torch.int16).numpy()
            for row, record, skip, count in rows:
                start = self.offsets[record] + skip
                self.acts[hook][start : start + count] = bits[row, :count]
                self.norms[hook][start : start + count] = row_norms[row, :count].numpy()

    def flush(self) -> None:
        for array in (*self.acts.values(), *self.norms.values()):
            array.flush()


def _padded(token_lists: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in token_lists)
    ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(list(tokens))
        mask[row, : len(tokens)] = 1
    return ids, mask


def collect(
    loaded: LoadedModel, encoded: list[EncodedChat], hooks: Sequence[str], folder: Path, batch_tokens: int,
    apart: Sequence[bool] | None = None,
) -> None:
    """Run the model over every record once and write the cache files under `folder`.

    Records that open with the same chat template and system prompt share one forward pass of that prefix:
    its key-value cache is reused for every record's remaining tokens, and its activations are copied into
    each record (on a 0.5B model on 2 CPU cores the prefix is a third of all tokens). Records marked `apart`
    run in batches of their own, so the others run in exactly the batches they would without them (the
    numerics of a batched product depend on the batch's shape).
    """
    token_lists = [e.ids for e in encoded]
    lengths = [len(ids) for ids in token_lists]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "tokens.npy", np.concatenate([np.asarray(ids, dtype=np.int32) for ids in token_lists]))
    np.save(folder / "content.npy", np.concatenate([np.asarray(e.content, dtype=bool) for e in encoded]))
    np.save(folder / "answer_start.npy", offsets[:-1] + np.array([e.prompt_length for e in encoded], dtype=np.int64))
    writer = _Writer(folder, hooks, int(offsets[-1]), loaded.d_model, offsets)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = loaded.device
    groups = shared_prefixes(encoded)
    grouped = {index for members in groups.values() for index in members}
    bar = tqdm(total=int(offsets[-1]), unit="tok", unit_scale=True, desc="collect activations")
    marked = list(apart) if apart is not None else [False] * len(encoded)
    for prefix, grouped_members in groups.items():
        cache, prefix_store = prefix_cache(loaded.model, hooks, torch.tensor([prefix], device=device))
        writer.write(prefix_store, [(0, index, 0, len(prefix)) for index in grouped_members])
        for members in phases(grouped_members, marked):
            suffixes = [token_lists[i][len(prefix) :] for i in members]
            for batch in length_batches([len(t) for t in suffixes], batch_tokens):
                ids, mask = _padded([suffixes[j] for j in batch], pad)
                store = capture_after_prefix(loaded.model, hooks, cache, ids.to(device), mask.to(device))
                writer.write(store, [(row, members[j], len(prefix), len(suffixes[j])) for row, j in enumerate(batch)])
                bar.update(int(mask.sum()) + len(batch) * len(prefix))
    for alone in phases([i for i in range(len(encoded)) if i not in grouped], marked):
        for batch in length_batches([lengths[i] for i in alone], batch_tokens):
            ids, mask = _padded([token_lists[alone[j]] for j in batch], pad)
            store = capture_activations(loaded.model, hooks, ids.to(device), mask.to(device))
            writer.write(store, [(row, alone[j], 0, lengths[alone[j]]) for row, j in enumerate(batch)])
            bar.update(int(mask.sum()))
    bar.close()
    writer.flush()


@dataclass
class ActivationCache:
    """Read access to an `activations` stage folder."""

    folder: Path
    records: list[dict]
    tokens: np.ndarray
    offsets: np.ndarray
    content: np.ndarray
    answer_start: np.ndarray

    @classmethod
    def open(cls, folder: Path) -> ActivationCache:
        folder = Path(folder)
        with open(folder / "records.jsonl", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        arrays = [np.load(folder / f"{name}.npy") for name in ("tokens", "offsets", "content", "answer_start")]
        return cls(folder, records, *arrays)

    @property
    def hooks(self) -> list[str]:
        return sorted(p.stem for p in (self.folder / "acts").glob("*.npy"))

    def acts(self, hook: str) -> np.ndarray:
        path = hook_file(self.folder, "acts", hook)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: hook point {hook} was not collected (have {self.hooks})")
        return np.load(path, mmap_mode="r")

    def norms(self, hook: str) -> np.ndarray:
        return np.load(hook_file(self.folder, "norms", hook), mmap_mode="r")

    def record_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.records)), np.diff(self.offsets))

    def token_span(self, records: Sequence[int]) -> np.ndarray:
        """The token positions of the given records, in order."""
        if len(records) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in records])

    def usable(self, hook: str, special: np.ndarray, outlier_factor: float, reference: np.ndarray) -> np.ndarray:
        """Tokens an SAE is trained and measured on: not special, and no extreme-norm outlier.

        The outlier cut is relative to the median norm of the non-special tokens in `reference` (a token
        mask): records outside it are cut by the same limit but cannot move it.
        """
        keep = ~np.isin(self.tokens, special)
        norms = self.norms(hook)
        measured = keep & reference
        limit = outlier_factor * np.median(norms[measured]) if measured.any() else np.inf
        return keep & (norms <= limit)

    def prefix_groups(self) -> list[tuple[int, list[int]]]:
        """(prefix length, records) for each prefix that `collect` ran once (`shared_prefixes`' rule): the
        records' activations on it are one copy, so whatever is computed from them needs computing once."""
        first = self._first_content()
        groups: dict[bytes, list[int]] = defaultdict(list)
        for record, start in enumerate(self.offsets[:-1]):
            length = int(first[record] - start)
            if MIN_SHARED_PREFIX <= length < int(self.offsets[record + 1] - start):
                groups[self.tokens[start : start + length].tobytes()].append(record)
        return [(len(key) // self.tokens.itemsize, members) for key, members in groups.items() if len(members) > 1]

    def _first_content(self) -> np.ndarray:
        """Per record, the position of its first content token (its end when it has none)."""
        first = self.offsets[1:].copy()
        positions = np.flatnonzero(self.content)
        np.minimum.at(first, self.record_of_token()[positions], positions)
        return first

    def shared_prefix(self) -> np.ndarray:
        """Tokens before a record's first content token: for chat records, the template and system prompt,
        the same in every record (training on them would repeat one activation thousands of times)."""
        first = self._first_content()  # a record without content is all prefix
        return np.arange(len(self.tokens)) < np.repeat(first, np.diff(self.offsets))


def as_float(bits: np.ndarray) -> torch.Tensor:
    """int16 bf16 bit patterns -> float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bfloat16).float()


def iter_chunks(cache: ActivationCache, hook: str, positions: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions, float32 activations) in chunks of `chunk` tokens, in the given order."""
    acts = cache.acts(hook)
    for start in range(0, len(positions), chunk):
        part = positions[start : start + chunk]
        # Fancy indexing of a memmap reads only the rows asked for; sorting keeps the reads sequential.
        order = np.argsort(part, kind="stable")
        rows = np.empty((len(part), acts.shape[1]), dtype=np.int16)
        rows[order] = acts[part[order]]
        yield part, as_float(rows)
