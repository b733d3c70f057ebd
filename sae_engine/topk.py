"""TopK sparse autoencoder: z = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)), x_hat = W_dec z + b_dec.

Two paths compute the same function. The dense path is plain autograd over a (batch, d_sae)
latent matrix and serves as the reference. The sparse path keeps only the k active latents:
decoding is an embedding-bag gather of k decoder rows, and the backward pass sends gradients
through the active latents alone, so the encoder's weight gradient costs O(batch * k * d_in)
instead of O(batch * d_sae * d_in).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENCODER_INIT_SCALE = 0.5


class TopKOutput(NamedTuple):
    values: Tensor  # (batch, k), >= 0
    indices: Tensor  # (batch, k), int64


class _SparseAutoencode(torch.autograd.Function):
    """Encode (TopK) and decode in one function whose backward touches only the selected latents.

    The encoder's and the decoder's weight gradients share one sparsity pattern (latent x token),
    so one sort builds both latent-major CSR matrices.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
                compute_dtype: torch.dtype):
        centred = x - b_dec
        pre = torch.addmm(b_enc.to(compute_dtype), centred.to(compute_dtype), W_enc.to(compute_dtype))
        top = pre.topk(k, dim=-1, sorted=False)
        values = top.values.to(x.dtype).relu_()
        x_hat = F.embedding_bag(top.indices, W_dec, per_sample_weights=values, mode="sum").add_(b_dec)
        ctx.save_for_backward(centred, W_enc, W_dec, top.indices, values)
        ctx.mark_non_differentiable(top.indices)
        return x_hat, values, top.indices

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor, grad_values: Tensor | None, _grad_indices: Tensor):
        centred, W_enc, W_dec, indices, values = ctx.saved_tensors
        grad_x_hat = grad_x_hat.contiguous()
        d_sae = W_enc.shape[1]
        # d x_hat / d values[b, j] = W_dec[idx[b, j]]: one dot product per selected latent.
        grad_pre = _gathered_dots(grad_x_hat, W_dec, indices)
        if grad_values is not None:
            grad_pre = grad_pre + grad_values
        grad_pre = grad_pre * (values > 0)
        pattern = _LatentMajor(indices, d_sae)
        grad_W_enc = (pattern.matrix(grad_pre) @ centred).t()
        grad_W_dec = pattern.matrix(values) @ grad_x_hat
        grad_b_enc = torch.zeros(d_sae, dtype=grad_pre.dtype, device=grad_pre.device).index_add_(
            0, indices.reshape(-1), grad_pre.reshape(-1)
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad_pre, mode="sum")
        # d pre / d b_dec = -W_enc over every selected latent: one mat-vec with the b_enc gradient.
        grad_b_dec = grad_x_hat.sum(0) - W_enc @ grad_b_enc
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None


def _gathered_dots(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """out[b, j] = rows[b] . table[indices[b, j]], without materialising the gathered table rows."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, indices.reshape(-1), torch.zeros(batch * k, dtype=rows.dtype, device=rows.device),
                                          (batch, table.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0).values().reshape(batch, k)


class _LatentMajor:
    """The (d_sae, batch) sparsity pattern of a TopK selection in CSR order, built once for several value sets."""

    def __init__(self, indices: Tensor, d_sae: int):
        batch, k = indices.shape
        flat = indices.reshape(-1)
        n = flat.numel()
        # Sorting unique keys (latent, position) is several times faster on CPU than argsort of the repeated latent ids.
        self.order = (flat * n + torch.arange(n, device=flat.device)).sort().values % n
        self.columns = self.order // k
        self.crow = torch.zeros(d_sae + 1, dtype=torch.long, device=indices.device)
        self.crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
        self.shape = (d_sae, batch)

    def matrix(self, values: Tensor) -> Tensor:
        """The CSR matrix with `values[b, j]` at row `indices[b, j]`, column b."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.crow, self.columns, values.reshape(-1)[self.order], self.shape,
                                           check_invariants=False)


class TopKSAE(nn.Module):
    """A TopK SAE with SAELens's parameter names and shapes."""

    def __init__(self, d_in: int, d_sae: int, k: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae ({d_sae}), got {k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        factory = {"dtype": dtype, "device": device}
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; the encoder starts as the decoder's transpose, at half its norm.

        At full norm the first reconstructions overshoot (k latents each as large as a unit
        projection) and training spends its first steps recovering: on SmolLM2 layer-14 MLP outputs
        the half-norm start reached a held-out FVU of 0.43 (k=64) and 0.25 (k=200) after 170k tokens,
        against 0.47 and 0.35 from the full-norm start (bench/RESULTS.md)."""
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32))
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.t() * ENCODER_INIT_SCALE)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_topk(self, x: Tensor, compute_dtype: torch.dtype | None = None) -> TopKOutput:
        """The k largest latents of each row, for inference.

        `compute_dtype` (e.g. bf16) applies to the encoder product and the selection only; latent
        values come back in the parameters' dtype.
        """
        flat = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        dtype = compute_dtype or self.W_enc.dtype
        pre = torch.addmm(self.b_enc.to(dtype), (flat - self.b_dec).to(dtype), self.W_enc.to(dtype))
        top = pre.topk(self.k, dim=-1, sorted=False)
        values = top.values.to(self.W_enc.dtype).relu()
        return TopKOutput(values.reshape(*x.shape[:-1], self.k), top.indices.reshape(*x.shape[:-1], self.k))

    def forward_topk(self, x: Tensor, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, TopKOutput]:
        """Reconstruction and selection (training path: gradients flow through the active latents only)."""
        flat = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        dtype = compute_dtype or self.W_enc.dtype
        x_hat, values, indices = _SparseAutoencode.apply(flat, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, dtype)
        lead = x.shape[:-1]
        return x_hat.reshape(*lead, self.d_in), TopKOutput(values.reshape(*lead, self.k), indices.reshape(*lead, self.k))

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (..., d_sae), zero outside the top k (reference path, plain autograd)."""
        top = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return torch.zeros(*x.shape[:-1], self.d_sae, dtype=x.dtype, device=x.device).scatter(
            -1, top.indices, top.values.relu()
        )

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_topk(self, top: TopKOutput) -> Tensor:
        flat_idx = top.indices.reshape(-1, self.k)
        flat_val = top.values.reshape(-1, self.k)
        out = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_val, mode="sum") + self.b_dec
        return out.reshape(*top.values.shape[:-1], self.d_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_topk(x)[0]

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
