"""The activation cache of a pipeline run: every corpus record's tokens and hooked activations, kept once.

One model pass over the corpus feeds everything after it (the config sweep, SAE training, feature
statistics, the filter and the evaluation), so the model never runs twice over the same text.

Layout of the `activations` stage folder:

- `records.jsonl`: one line per cached record (corpus fields + `index`), in cache order;
- `tokens.npy` (int32, all records' token ids end to end) and `offsets.npy` (int64, n_records + 1):
  record i owns tokens `offsets[i]:offsets[i+1]`; each record starts with the BOS token;
- `acts/<hook name>.npy`: (n_tokens, d_model) activations as the bit patterns of bfloat16 stored
  as int16 (numpy has no bfloat16; the model computes in bf16 on CPU, so this is lossless there
  and half the size of fp32); opened memory-mapped;
- `norms/<hook name>.npy`: float32 L2 norm per token, for the outlier mask.

Records are run in batches of similar length (right padding, attention mask), longest first, and
the forward pass stops after the deepest hooked layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_engine.hooks import capture_activations
from sae_engine.models import LoadedModel


def hook_file(folder: Path, kind: str, hook: str) -> Path:
    return folder / kind / f"{hook}.npy"


def tokenize_records(texts: Sequence[str], tokenizer, max_tokens: Sequence[int]) -> list[list[int]]:
    """BOS + the text's tokens (special tokens in the text, e.g. a chat template, are parsed), truncated."""
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[opener, *ids[: cap - 1]] for ids, cap in zip(encoded, max_tokens)]


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


def collect(
    loaded: LoadedModel, token_lists: list[list[int]], hooks: Sequence[str], folder: Path, batch_tokens: int
) -> None:
    """Run the model over every record once and write the cache files under `folder`."""
    lengths = [len(ids) for ids in token_lists]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens, d_model = int(offsets[-1]), loaded.d_model
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "tokens.npy", np.concatenate([np.asarray(ids, dtype=np.int32) for ids in token_lists]))
    acts, norms = {}, {}
    for hook in hooks:
        hook_file(folder, "acts", hook).parent.mkdir(parents=True, exist_ok=True)
        hook_file(folder, "norms", hook).parent.mkdir(parents=True, exist_ok=True)
        acts[hook] = np.lib.format.open_memmap(hook_file(folder, "acts", hook), "w+", np.int16, (n_tokens, d_model))
        norms[hook] = np.lib.format.open_memmap(hook_file(folder, "norms", hook), "w+", np.float32, (n_tokens,))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="collect activations")
    for batch in length_batches(lengths, batch_tokens):
        width = lengths[batch[0]]
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.tensor(token_lists[index])
            mask[row, : lengths[index]] = 1
        store = capture_activations(loaded.model, hooks, ids.to(loaded.device), mask.to(loaded.device))
        for hook, tensor in store.items():
            tensor = tensor.to("cpu", torch.bfloat16)
            row_norms = tensor.float().norm(dim=-1)
            bits = tensor.view(torch.int16).numpy()
            for row, index in enumerate(batch):
                start, end = offsets[index], offsets[index + 1]
                acts[hook][start:end] = bits[row, : lengths[index]]
                norms[hook][start:end] = row_norms[row, : lengths[index]].numpy()
        bar.update(int(mask.sum()))
    bar.close()
    for array in (*acts.values(), *norms.values()):
        array.flush()


@dataclass
class ActivationCache:
    """Read access to an `activations` stage folder."""

    folder: Path
    records: list[dict]
    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def open(cls, folder: Path) -> ActivationCache:
        folder = Path(folder)
        with open(folder / "records.jsonl", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        return cls(folder, records, np.load(folder / "tokens.npy"), np.load(folder / "offsets.npy"))

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

    def usable(self, hook: str, special: np.ndarray, outlier_factor: float) -> np.ndarray:
        """Tokens an SAE is trained and measured on: not special, and no extreme-norm outlier.

        The outlier cut is relative to the median norm of all non-special tokens of the hook.
        """
        keep = ~np.isin(self.tokens, special)
        norms = self.norms(hook)
        limit = outlier_factor * np.median(norms[keep]) if keep.any() else np.inf
        return keep & (norms <= limit)


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
