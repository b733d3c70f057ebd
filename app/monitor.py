"""The monitors of a live SAE set: a prompt's calibrated risk per domain, and the SAE features behind it.

Each dense probe reads one hooked layer (the mean over the user turn's content tokens, or the last prompt
token) and gives `p = sigmoid(a * (w . x + b_w) + b)`. Its logit splits over the SAE features of that layer:
the activation is the SAE's reconstruction plus its error, `x = sum_f z_f W_dec[f] + b_dec + e`, so feature f
adds `z_f (w . W_dec[f])` (z_f averaged over the turn for the "mean" probe). The largest such terms are the
alarm's reasons. The k-sparse SAE probe is shown beside it for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_engine.inference import SAEBundle

N_REASONS = 5


@dataclass
class DenseProbe:
    domain: str
    layer: int
    slot: int
    representation: str  # "mean" or "last"
    weights: Tensor  # (d_in,)
    bias: float
    calibration: tuple[float, float]
    per_feature: Tensor  # (d_sae,) w . W_dec[f]: the logit one unit of feature f adds


@dataclass
class SparseProbe:
    domain: str
    slots: Tensor  # (k,)
    indices: Tensor  # (k,)
    weights: Tensor  # (k,)
    bias: float
    calibration: tuple[float, float]


def _calibrated(logit: float, calibration: tuple[float, float]) -> float:
    a, b = calibration
    return float(torch.sigmoid(torch.tensor(a * logit + b)))


class Monitors:
    def __init__(self, rows: list[dict], bundle: SAEBundle) -> None:
        self.bundle = bundle
        self.dense: list[DenseProbe] = []
        self.sparse: list[SparseProbe] = []
        device = bundle.W_dec.device
        for row in rows:
            weights = torch.tensor(row["weights"], dtype=torch.float32, device=device)
            calibration = (float(row["calibration"][0]), float(row["calibration"][1]))
            if row["method"] == "probe" and row["layer"] in bundle.layers:
                slot = bundle.slot(row["layer"])
                self.dense.append(DenseProbe(row["domain"], row["layer"], slot, row["representation"], weights,
                                             float(row["bias"]), calibration, bundle.W_dec[slot] @ weights))
            elif row["method"] == "ksparse" and all(layer in bundle.layers for layer, _ in row["features"]):
                slots = torch.tensor([bundle.slot(layer) for layer, _ in row["features"]], device=device)
                indices = torch.tensor([index for _, index in row["features"]], device=device)
                self.sparse.append(SparseProbe(row["domain"], slots, indices, weights, float(row["bias"]), calibration))

    def __bool__(self) -> bool:
        return bool(self.dense or self.sparse)

    def assess(self, acts: Tensor, content: Tensor) -> dict:
        """The risks of a prompt: acts (L, T, d_in) of its tokens, content (T,) marks the user turn's words."""
        if not bool(content.any()):
            content = torch.ones_like(content)
        top = self.bundle.encode(acts)
        d_sae = self.bundle.d_sae
        values, indices = top.values.float(), top.indices
        n_content = int(content.sum())

        def mean_code(slot: int) -> Tensor:
            flat = torch.zeros(d_sae, device=acts.device)
            return flat.scatter_add_(0, indices[slot, content].flatten(), values[slot, content].flatten()) / n_content

        def max_code(slot: int) -> Tensor:
            flat = torch.zeros(d_sae, device=acts.device)
            return flat.scatter_reduce_(0, indices[slot, content].flatten(), values[slot, content].flatten(), "amax")

        probe = {}
        for p in self.dense:
            if p.representation == "mean":
                x, z = acts[p.slot, content].float().mean(0), mean_code(p.slot)
            else:
                x = acts[p.slot, -1].float()
                z = torch.zeros(d_sae, device=acts.device).scatter_(0, indices[p.slot, -1], values[p.slot, -1])
            logit = float(x @ p.weights) + p.bias
            terms, where = (z * p.per_feature).topk(min(N_REASONS, d_sae))
            probe[p.domain] = {
                "p": round(_calibrated(logit, p.calibration), 4),
                "logit": round(logit, 4),
                "layer": p.layer,
                "representation": p.representation,
                "reasons": [
                    {"id": f"{p.layer}_{int(i)}", "contribution": round(float(v), 4), "activation": round(float(z[i]), 4)}
                    for v, i in zip(terms.tolist(), where.tolist())
                    if v > 0
                ],
            }
        maxima = {int(slot): max_code(int(slot)) / self.bundle.normalisers[int(slot)]
                  for slot in {s for p in self.sparse for s in p.slots.tolist()}}
        ksparse = {}
        for p in self.sparse:
            x = torch.stack([maxima[int(s)][int(i)] for s, i in zip(p.slots, p.indices)])
            ksparse[p.domain] = round(_calibrated(float(x @ p.weights) + p.bias, p.calibration), 4)
        return {"probe": probe, "ksparse": ksparse}
