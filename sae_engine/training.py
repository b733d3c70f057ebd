"""Training TopK SAEs the way the best trainers do (EleutherAI sparsify, SAELens, OpenAI's TopK paper).

- Activations are scaled to unit mean squared norm; the scale is folded into the saved weights.
- b_dec starts at the geometric median of the first batch; W_enc starts as W_dec transposed.
- Loss = FVU + (1/32) AuxK: dead latents reconstruct the residual of the live ones.
- Decoder rows stay unit norm: the parallel gradient component is removed, rows renormalised each step.
- lr = 2e-4 / sqrt(d_sae / 2^14) unless given.
- One model pass feeds every configured hook point (`MultiSAETrainer`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_engine.distributed import (
    agreed_count,
    all_gather_rows,
    all_reduce_sum,
    rank,
    sum_gradients,
    world_size,
)
from sae_engine.hooks import HookPoint, as_hook_points, capture, run_to_capture
from sae_engine.models import LoadedModel, resolve_dtype
from sae_engine.tokens import TokenBatch, special_ids, training_mask
from sae_engine.topk import TopKSAE


@dataclass
class SAETrainConfig:
    k: int = 64
    expansion_factor: int = 10
    batch_size: int = 2048
    lr: float | None = None
    auxk_alpha: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    outlier_factor: float = 10.0
    shuffle_buffer_batches: int = 8
    seed: int = 0
    compute_dtype: str = "auto"

    def d_sae(self, d_in: int) -> int:
        return d_in * self.expansion_factor

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


def geometric_median(points: Tensor, iterations: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm; robust to the heavy tails of residual-stream activations."""
    guess = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < eps * guess.norm().clamp_min(1):
            return new
        guess = new
    return guess


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum of squared error over total variance."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def global_total_variance(x: Tensor) -> Tensor:
    """Total variance of the rows of `x` pooled over all data-parallel ranks."""
    stats = torch.cat([x.sum(0), x.pow(2).sum(0), x.new_tensor([len(x)])]).detach()
    all_reduce_sum(stats)
    d = x.shape[1]
    total, squares, n = stats[:d], stats[d : 2 * d], stats[-1]
    return (squares - total.pow(2) / n).sum().clamp_min(1e-12)


@dataclass
class StepStats:
    loss: float
    fvu: float
    auxk: float
    dead_fraction: float
    tokens: int


@dataclass
class TrainedSAE:
    sae: TopKSAE
    hook_name: str
    tokens_trained: int
    scale: float
    final_stats: dict = field(default_factory=dict)


class SAETrainer:
    """Trains one TopK SAE on a stream of activation batches of shape (n, d_in)."""

    def __init__(self, d_in: int, hook_name: str, config: SAETrainConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.hook_name = hook_name
        self.device = torch.device(device)
        d_sae = config.d_sae(d_in)
        generator = torch.Generator().manual_seed(config.seed)
        self.sae = TopKSAE(d_in, d_sae, config.k)
        self.sae.reset_parameters(generator)
        self.sae.to(self.device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=config.learning_rate(d_sae), eps=6.25e-10)
        self.compute_dtype = resolve_dtype(config.compute_dtype, self.device)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.fired_count = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.scale: float | None = None
        self.tokens_trained = 0
        self.last = StepStats(math.nan, math.nan, 0.0, 0.0, 0)

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        x = all_gather_rows(x)
        self.scale = float(x.pow(2).sum(-1).mean().sqrt())
        self.sae.b_dec.copy_(geometric_median(x / self.scale))

    def step(self, x: Tensor) -> StepStats:
        x = x.to(self.device, torch.float32)
        if self.scale is None:
            self._initialise(x)
        x = x / self.scale
        sae = self.sae
        # Selection in bf16 where the hardware has it (as autocast would on a GPU); weights and gradients in fp32.
        x_hat, top = sae.forward_topk(x, self.compute_dtype)
        # Each rank's share of the global FVU; summing gradients over ranks gives the global step.
        recon = (x_hat - x).pow(2).sum() / global_total_variance(x)
        dead = self.tokens_since_fired > self.config.dead_after_tokens
        auxk = self._auxk_loss(x, x_hat.detach(), dead) if dead.any() else x.new_zeros(())
        loss = recon + self.config.auxk_alpha * auxk
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(sae.parameters())
        sae.project_decoder_grad()
        self.optimizer.step()
        sae.normalize_decoder()
        n_tokens = int(all_reduce_sum(x.new_tensor([len(x)])).item())
        self._update_dead(top.indices, top.values, n_tokens)
        self.tokens_trained += n_tokens
        totals = all_reduce_sum(torch.stack([loss.detach(), recon.detach(), auxk.detach()]))
        self.last = StepStats(*totals.tolist(), float(dead.float().mean()), n_tokens)
        return self.last

    def _auxk_loss(self, x: Tensor, x_hat: Tensor, dead: Tensor) -> Tensor:
        sae = self.sae
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(sae.d_in // 2, len(dead_idx))
        # A handful of dead latents cannot carry the whole residual: weight the loss by how many there are.
        weight = min(len(dead_idx) / (sae.d_in // 2), 1.0)
        residual = x - x_hat
        pre = (x - sae.b_dec.detach()) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]
        top = pre.topk(k_aux, dim=-1, sorted=False)
        residual_hat = torch.nn.functional.embedding_bag(
            top.indices, sae.W_dec[dead_idx], per_sample_weights=top.values.relu(), mode="sum"
        )
        return weight * (residual_hat - residual).pow(2).sum() / global_total_variance(residual)

    @torch.no_grad()
    def _update_dead(self, indices: Tensor, values: Tensor, n_tokens: int) -> None:
        """`n_tokens` is the global step's token count; firing counts are summed over ranks."""
        active = indices[values > 0]
        fired = torch.zeros_like(self.fired_count).index_add_(0, active, torch.ones_like(active))
        all_reduce_sum(fired)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0
        self.fired_count += fired

    @torch.no_grad()
    def finish(self, model_name: str, context_size: int, extra_metadata: dict | None = None) -> TrainedSAE:
        """The trained SAE in raw activation units (the normalisation scale folded into b_enc and b_dec)."""
        scale = self.scale or 1.0
        folded = TopKSAE(self.sae.d_in, self.sae.d_sae, self.sae.k)
        folded.load_state_dict(self.sae.state_dict())
        folded.b_enc.mul_(scale)
        folded.b_dec.mul_(scale)
        folded.cpu()
        density = (self.fired_count.float() / max(self.tokens_trained, 1)).cpu()
        folded.metadata = {
            "model_name": model_name,
            "hook_name": self.hook_name,
            "context_size": context_size,
            "training_tokens": self.tokens_trained,
            "activation_scale": scale,
            "train_config": asdict(self.config),
            **(extra_metadata or {}),
        }
        folded.feature_density = density
        return TrainedSAE(folded, self.hook_name, self.tokens_trained, scale, asdict(self.last))


class ShuffleBuffer:
    """Mixes tokens from several model batches before they reach an SAE step."""

    def __init__(self, batch_size: int, n_batches: int, generator: torch.Generator):
        self.batch_size = batch_size
        self.capacity = batch_size * n_batches
        self.generator = generator
        self.chunks: list[Tensor] = []
        self.size = 0

    def add(self, x: Tensor) -> list[Tensor]:
        self.chunks.append(x)
        self.size += len(x)
        return self._drain(self.capacity)

    def flush(self) -> list[Tensor]:
        return self._drain(0)

    def _drain(self, keep_below: int) -> list[Tensor]:
        if self.size < max(keep_below, 1) or not self.chunks:
            return []
        pool = torch.cat(self.chunks)
        pool = pool[torch.randperm(len(pool), generator=self.generator)]
        n_full = len(pool) // self.batch_size if keep_below else math.ceil(len(pool) / self.batch_size)
        out = [pool[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_full)]
        rest = pool[n_full * self.batch_size :]
        self.chunks = [rest] if len(rest) else []
        self.size = len(rest)
        return [b for b in out if len(b) >= self.batch_size // 2]


class MultiSAETrainer:
    """One SAE per hook point, all fed from the same forward passes of the model."""

    def __init__(self, loaded: LoadedModel, hook_points: Iterable[str | HookPoint], config: SAETrainConfig, device=None):
        self.loaded = loaded
        self.points = as_hook_points(hook_points)
        self.config = config
        self.device = torch.device(device) if device else loaded.device
        d_in = loaded.d_model
        self.trainers = {p.name: SAETrainer(d_in, p.name, config, self.device) for p in self.points}
        self.special = special_ids(loaded.tokenizer)
        generator = torch.Generator().manual_seed(config.seed)
        self.buffers = {
            name: ShuffleBuffer(config.batch_size, config.shuffle_buffer_batches, generator) for name in self.trainers
        }
        self.context_size = 0
        self.model_tokens = 0

    def collect(self, batch: TokenBatch) -> dict[str, Tensor]:
        """Masked activations (n, d_in) for every hook point from one forward pass."""
        device = self.loaded.device
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        with capture(self.loaded.model, self.points) as store:
            run_to_capture(self.loaded.model, input_ids=input_ids, attention_mask=attention_mask)
        out = {}
        for name, acts in store.items():
            keep = training_mask(acts, input_ids, attention_mask, self.special, self.config.outlier_factor)
            out[name] = acts[keep].float()
        return out

    def train(self, batches: Iterable[TokenBatch], total_tokens: int | None = None) -> dict[str, TrainedSAE]:
        progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="train SAEs", disable=rank() != 0)
        pending: dict[str, list[Tensor]] = {name: [] for name in self.trainers}
        for number, batch in enumerate(batches):
            # Under torchrun each rank takes every world_size-th batch; the token budget stays global.
            if number % world_size() == rank():
                self.context_size = max(self.context_size, batch.input_ids.shape[1])
                for name, acts in self.collect(batch).items():
                    pending[name].extend(self.buffers[name].add(acts))
            self._step_agreed(pending)
            self.model_tokens += batch.n_tokens
            progress.update(batch.n_tokens)
            progress.set_postfix(self._postfix(), refresh=False)
            if total_tokens is not None and self.model_tokens >= total_tokens:
                break
        for name, buffer in self.buffers.items():
            pending[name].extend(buffer.flush())
        self._step_agreed(pending, drain=True)
        progress.close()
        return {
            name: trainer.finish(self.loaded.name, self.context_size) for name, trainer in self.trainers.items()
        }

    def _step_agreed(self, pending: dict[str, list[Tensor]], drain: bool = False) -> None:
        """Step each SAE on as many ready batches as every rank has (a step is a collective operation).

        `drain`: step until every rank's batches are used; a rank that has run out joins each step
        with no rows (the step's statistics and gradients are global sums, so it adds nothing)."""
        empty = torch.empty(0, self.loaded.d_model)
        for name, chunks in pending.items():
            for _ in range(agreed_count(len(chunks), largest=drain)):
                self.trainers[name].step(chunks.pop(0) if chunks else empty)

    def _postfix(self) -> dict[str, str]:
        losses = [t.last.fvu for t in self.trainers.values() if not math.isnan(t.last.fvu)]
        dead = [t.last.dead_fraction for t in self.trainers.values()]
        return {
            "fvu": f"{sum(losses) / len(losses):.3f}" if losses else "-",
            "dead": f"{max(dead):.2%}",
        }
