"""Training an SAE from the activation cache: shuffled epochs over the cached training tokens.

The cache holds each training token once; `total_tokens` larger than that runs several epochs,
each in a fresh seeded order, through the same `SAETrainer.step` the streaming trainer uses.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from offline_pipeline.activation_cache import ActivationCache, as_float
from sae_engine.training import SAETrainConfig, SAETrainer, TrainedSAE


def train_from_cache(
    cache: ActivationCache,
    hook: str,
    positions: np.ndarray,
    config: SAETrainConfig,
    total_tokens: int,
    model_name: str,
    context_size: int,
    device: str | torch.device = "cpu",
    extra_metadata: dict | None = None,
) -> TrainedSAE:
    if len(positions) < config.batch_size:
        raise ValueError(
            f"{hook}: {len(positions)} cached training tokens, fewer than one batch ({config.batch_size})"
        )
    acts = cache.acts(hook)
    # The training tokens of one hook, in memory as bf16 bit patterns (half the size of fp32).
    data = np.asarray(acts[np.sort(positions)])
    trainer = SAETrainer(data.shape[1], hook, config, device)
    rng = np.random.default_rng(config.seed)
    done, epoch = 0, 0
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"train {hook}")
    while done < total_tokens:
        order = rng.permutation(len(data))
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            stats = trainer.step(as_float(data[order[start : start + config.batch_size]]))
            done += config.batch_size
            bar.update(config.batch_size)
            bar.set_postfix(fvu=f"{stats.fvu:.3f}", dead=f"{stats.dead_fraction:.1%}", epoch=epoch, refresh=False)
            if done >= total_tokens:
                break
        epoch += 1
    bar.close()
    metadata = {"epochs": round(done / len(data), 3), "distinct_training_tokens": len(data), **(extra_metadata or {})}
    return trainer.finish(model_name, context_size, metadata)
