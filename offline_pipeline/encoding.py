"""SAE codes of cached activations: per-token TopK codes and per-record maxima.

Tokens outside the usable mask (BOS and other special tokens, extreme-norm outliers) get no
activation, the same tokens SAE training left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from offline_pipeline.activation_cache import ActivationCache, iter_chunks
from sae_engine.topk import TopKOutput, TopKSAE


def sae_precision(preset) -> torch.dtype | None:
    """The precision of a run's SAE encoder products: on CPU the preset's (resolved) dtype, the one its stage
    keys hash (bf16 halves the products' time where the CPU has it); elsewhere the SAE's own (None)."""
    from sae_engine.models import resolve_device, resolve_dtype

    device = resolve_device(preset.device)
    return resolve_dtype(preset.dtype, device) if device.type == "cpu" else None


@torch.no_grad()
def encode(sae: TopKSAE, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK (indices, values) of activations x (n, d_in), values >= 0; the encoder product in `dtype`
    (None: the SAE's own)."""
    top = sae.encode_topk(x.to(sae.W_enc.device), dtype)
    return top.indices.cpu(), top.values.float().cpu()


def record_groups(cache: ActivationCache, records: Sequence[int], chunk_tokens: int) -> Iterator[list[int]]:
    """Whole records grouped into chunks of about `chunk_tokens` tokens."""
    group: list[int] = []
    size = 0
    for record in records:
        length = int(cache.offsets[record + 1] - cache.offsets[record])
        if group and size + length > chunk_tokens:
            yield group
            group, size = [], 0
        group.append(record)
        size += length
    if group:
        yield group


def encode_records(
    sae: TopKSAE,
    cache: ActivationCache,
    hook: str,
    records: Sequence[int],
    usable: np.ndarray,
    chunk_tokens: int = 8192,
    skip: np.ndarray | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[list[int], np.ndarray, torch.Tensor, torch.Tensor]]:
    """Per group of whole records: (records, token positions, indices, values), zero at unusable tokens.
    Positions where `skip` is set are left out; `dtype` as in `encode`."""
    for group in record_groups(cache, records, chunk_tokens):
        positions = cache.token_span(group)
        if skip is not None:
            positions = positions[~skip[positions]]
        for part, x in iter_chunks(cache, hook, positions, len(positions)):
            indices, values = encode(sae, x, dtype)
            values[~torch.from_numpy(usable[part])] = 0
            yield group, part, indices, values


def record_max_matrix(
    sae: TopKSAE, cache: ActivationCache, hook: str, records: Sequence[int], usable: np.ndarray, chunk_tokens: int = 8192,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """(len(records), d_sae) maximum activation of every feature over each record's usable tokens."""
    return record_max_matrices(sae, cache, hook, records, [usable], chunk_tokens, dtype)[0]


def record_max_matrices(
    sae: TopKSAE, cache: ActivationCache, hook: str, records: Sequence[int], masks: Sequence[np.ndarray], chunk_tokens: int = 8192,
    dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """`record_max_matrix` under several token masks, from one encoding pass."""
    out = [np.zeros((len(records), sae.d_sae), dtype=np.float32) for _ in masks]
    row_of = np.full(len(cache.records), -1, dtype=np.int64)
    row_of[np.asarray(records, dtype=np.int64)] = np.arange(len(records))
    record_of_token = cache.record_of_token()
    everything = np.ones(len(cache.tokens), dtype=bool)
    for _, part, indices, values in encode_records(sae, cache, hook, records, everything, chunk_tokens, dtype=dtype):
        rows = torch.from_numpy(row_of[record_of_token[part]])
        flat = (rows[:, None] * sae.d_sae + indices).reshape(-1)
        for matrix, mask in zip(out, masks):
            kept = values * torch.from_numpy(mask[part])[:, None]
            torch.from_numpy(matrix).view(-1).scatter_reduce_(0, flat, kept.reshape(-1), "amax", include_self=True)
    return out


def reconstruction_stats(
    sae: TopKSAE, cache: ActivationCache, hook: str, positions: np.ndarray, chunk_tokens: int = 8192,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """FVU and mean L0 of the SAE over the given token positions."""
    if len(positions) == 0:
        return {"fvu": float("nan"), "l0": float("nan"), "tokens": 0}
    sq_err = 0.0
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    total_sq = torch.zeros(sae.d_in, dtype=torch.float64)
    active = 0
    with torch.no_grad():
        for _, x in iter_chunks(cache, hook, positions, chunk_tokens):
            indices, values = encode(sae, x, dtype)
            x_hat = sae.decode_topk(TopKOutput(values.to(sae.W_dec.device), indices.to(sae.W_dec.device))).cpu()
            sq_err += float((x_hat - x).double().pow(2).sum())
            total += x.double().sum(0)
            total_sq += x.double().pow(2).sum(0)
            active += int((values > 0).sum())
    n = len(positions)
    variance = float((total_sq - total.pow(2) / n).sum())
    return {"fvu": sq_err / variance if variance > 0 else float("nan"), "l0": active / n, "tokens": n}
