"""How good an SAE is: reconstruction (FVU), sparsity (L0, dead fraction, density) and downstream loss.

The downstream metric splices the reconstruction into the model in place of the hooked
activation and measures the increase of next-token cross-entropy; "loss recovered" compares
it with zero-ablating the same activation: 1.0 = as good as the clean model, 0.0 = as bad as zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_engine.hooks import capture, edit
from sae_engine.models import LoadedModel
from sae_engine.tokens import TokenBatch, special_ids, training_mask
from sae_engine.topk import TopKSAE

DENSITY_BINS = torch.linspace(-8, 0, 33)


@dataclass
class SAEMetrics:
    fvu: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_increase: float
    loss_recovered: float
    tokens: int
    density_histogram: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _next_token_ce(logits: Tensor, batch: TokenBatch) -> tuple[float, int]:
    """Summed cross-entropy of next-token predictions over real (non-padding) positions, and their count."""
    targets = batch.input_ids[:, 1:].to(logits.device)
    valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool().to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    return float(losses[valid.flatten()].sum()), int(valid.sum())


def density_histogram(density: Tensor) -> dict:
    """Histogram of log10 feature density (dead features counted apart)."""
    alive = density > 0
    counts = torch.histc(density[alive].log10().clamp(-8, 0), bins=len(DENSITY_BINS) - 1, min=-8, max=0)
    return {"log10_edges": DENSITY_BINS.tolist(), "counts": counts.long().tolist(), "dead": int((~alive).sum())}


@torch.inference_mode()
def evaluate_saes(
    loaded: LoadedModel, saes: Mapping[str, TopKSAE], batches: Iterable[TokenBatch], outlier_factor: float = 10.0
) -> dict[str, SAEMetrics]:
    """Metrics for several SAEs on the same token batches (one clean pass, one spliced and one ablated pass per SAE)."""
    model, device = loaded.model, loaded.device
    special = special_ids(loaded.tokenizer)
    totals = {hook: {"sq_err": 0.0, "var": 0.0, "l0": 0.0, "n": 0, "ce_sae": 0.0, "ce_zero": 0.0} for hook in saes}
    fired = {hook: torch.zeros(sae.d_sae, dtype=torch.bool) for hook, sae in saes.items()}
    ce_clean, n_ce = 0.0, 0
    sums: dict[str, Tensor] = {}
    sq_sums: dict[str, Tensor] = {}
    for batch in batches:
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        with capture(model, list(saes), stop_early=False) as store:
            logits = model(**inputs, use_cache=False).logits
        ce, n = _next_token_ce(logits, batch)
        ce_clean, n_ce = ce_clean + ce, n_ce + n
        for hook, sae in saes.items():
            acts = store[hook]
            keep = training_mask(acts, inputs["input_ids"], inputs["attention_mask"], special, outlier_factor)
            x = acts[keep].float().to(sae.W_enc.device)
            z = sae.encode(x)
            t = totals[hook]
            t["sq_err"] += float((sae.decode(z) - x).pow(2).sum())
            sums[hook] = sums.get(hook, 0) + x.sum(0)
            sq_sums[hook] = sq_sums.get(hook, 0) + x.pow(2).sum(0)
            t["l0"] += float((z > 0).sum())
            t["n"] += len(x)
            fired[hook] |= (z > 0).any(0).cpu()
            t["ce_sae"] += _spliced_ce(loaded, hook, lambda h, sae=sae: sae.forward_dense(h.float()).to(h.dtype), inputs, batch)
            t["ce_zero"] += _spliced_ce(loaded, hook, torch.zeros_like, inputs, batch)
    results = {}
    for hook, t in totals.items():
        n = max(t["n"], 1)
        total_var = float((sq_sums[hook] - sums[hook].pow(2) / n).sum()) if t["n"] else float("nan")
        clean, spliced, zero = ce_clean / n_ce, t["ce_sae"] / n_ce, t["ce_zero"] / n_ce
        density = getattr(saes[hook], "feature_density", None)
        dead = float((density == 0).float().mean()) if density is not None else float((~fired[hook]).float().mean())
        results[hook] = SAEMetrics(
            fvu=t["sq_err"] / total_var,
            l0=t["l0"] / n,
            dead_fraction=dead,
            ce_clean=clean,
            ce_sae=spliced,
            ce_zero=zero,
            ce_increase=spliced - clean,
            loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
            tokens=t["n"],
            density_histogram=density_histogram(density) if density is not None else {},
        )
    return results


def _spliced_ce(loaded: LoadedModel, hook: str, fn, inputs: dict, batch: TokenBatch) -> float:
    with edit(loaded.model, {hook: fn}):
        logits = loaded.model(**inputs, use_cache=False).logits
    return _next_token_ce(logits, batch)[0]
