"""Token streams for activation collection: texts packed into fixed-length rows, and the training mask."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (rows, context)
    attention_mask: torch.Tensor  # (rows, context)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pack_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int = 128, batch_rows: int = 16
) -> Iterator[TokenBatch]:
    """Concatenate documents (each opened by BOS where the tokenizer has one, closed by EOS) into full rows.

    Every row starts with a BOS/EOS token, so position 0 never carries a mid-document token whose
    attention sink would be a different token in each row.
    """
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    closer = tokenizer.eos_token_id
    buffer: list[int] = []
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buffer.extend([opener, *ids] + ([closer] if closer is not None else []))
        while len(buffer) >= context_size:
            rows.append(buffer[:context_size])
            buffer = [opener, *buffer[context_size:]] if len(buffer) > context_size else []
            if len(rows) == batch_rows:
                yield _to_batch(rows)
                rows = []
    if rows:
        yield _to_batch(rows)


def _to_batch(rows: list[list[int]]) -> TokenBatch:
    ids = torch.tensor(rows, dtype=torch.long)
    return TokenBatch(ids, torch.ones_like(ids))


def special_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The ids of BOS/EOS/PAD and every other special token (chat markers such as `<|im_start|>` included)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return torch.tensor(sorted(set(tokenizer.all_special_ids) | added), dtype=torch.long)


def training_mask(
    acts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, special: torch.Tensor, outlier_factor: float
) -> torch.Tensor:
    """Tokens to train on: real, not special, and without an extreme activation norm.

    Attention-sink positions carry norms tens of times the median; a handful of them would
    dominate the FVU and waste latents on reconstructing a single direction.
    """
    keep = attention_mask.bool() & ~torch.isin(input_ids, special.to(input_ids.device))
    norms = acts.float().norm(dim=-1)
    if keep.any():
        keep &= norms <= outlier_factor * norms[keep].median()
    return keep
