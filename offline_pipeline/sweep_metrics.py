"""Pre-explanation metrics of an SAE configuration: distinguishing frequency, L0,t and I_CDF.

The Safe-SAIL paper ranks SAE configurations by how many features tell a safety concept apart
from a minimally edited twin, before any feature is explained. Its exact formulas were not
published in reachable text; these are the project's definitions.

Inputs: for one domain, N Concept Contrastive Query Pairs (q+_i, q-_i) (pooled over the domain's
concepts), and for every feature f the query-level activation a_f(q) = max over the query's tokens
of f's normalised activation (raw activation / the feature's normaliser, so one threshold grid
means the same thing for every feature and every SAE).

- Distinguishing frequency at threshold t:
      d_f(t) = (1/N) * #{ i : a_f(q+_i) > t  and  a_f(q-_i) <= t }
  the fraction of pairs on which f fires for the concept but stays below t on its twin.
- L0,t = #{ f : d_f(t) > 0 }: the absolute number of concept-distinguishing features at t.
  Pooling the pairs of a domain's concepts gives the union over concepts of their distinguishing
  features, since d_f(t) > 0 only needs one distinguished pair.
- I_CDF(t) = integral over x in [0, 1] of (1 - F_t(x)) dx, where F_t is the empirical CDF of
  { d_f(t) : d_f(t) > 0 }: the expected distinguishing frequency of a distinguishing feature
  (for a variable in [0, 1], the integral of its survival function is its mean). Undefined (NaN)
  when no feature distinguishes any pair.

L0,t counts how many features carry a concept; I_CDF says how reliably they carry it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def distinguishing_frequency(positive: np.ndarray, negative: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """d_f(t) for every threshold and feature: shape (len(thresholds), n_features).

    `positive[i, f]` = a_f(q+_i) and `negative[i, f]` = a_f(q-_i), pairs aligned by row.
    """
    positive, negative = np.asarray(positive, dtype=np.float32), np.asarray(negative, dtype=np.float32)
    if positive.shape != negative.shape or positive.ndim != 2:
        raise ValueError(
            f"positive and negative must be (pairs, features) arrays of one shape, got {positive.shape} and {negative.shape}"
        )
    n_pairs = positive.shape[0]
    if n_pairs == 0:
        raise ValueError("distinguishing_frequency needs at least one contrastive pair")
    out = np.empty((len(thresholds), positive.shape[1]), dtype=np.float64)
    for row, t in enumerate(thresholds):
        out[row] = ((positive > t) & (negative <= t)).sum(axis=0) / n_pairs
    return out


def l0_t(frequencies: np.ndarray) -> np.ndarray:
    """L0,t per threshold: the number of features with d_f(t) > 0."""
    return (np.asarray(frequencies) > 0).sum(axis=-1)


def survival_integral(values: np.ndarray) -> float:
    """Integral over [0, 1] of 1 - F(x), F the empirical CDF of `values` (all in [0, 1]); NaN when empty."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0:
        return float("nan")
    if values[0] < 0 or values[-1] > 1:
        raise ValueError("survival_integral expects values in [0, 1]")
    # 1 - F is a step function: between consecutive sorted values v_(j-1) and v_(j) it equals
    # the fraction of values at or above v_(j), i.e. (m - j + 1) / m.
    gaps = np.diff(values, prepend=0.0)
    above = np.arange(values.size, 0, -1) / values.size
    return float((gaps * above).sum())


def i_cdf(frequencies: np.ndarray) -> np.ndarray:
    """I_CDF per threshold over the features that distinguish at that threshold."""
    frequencies = np.atleast_2d(np.asarray(frequencies))
    return np.array([survival_integral(row[row > 0]) for row in frequencies])


def query_max(token_acts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-query maximum of token activations (tokens, features) for queries `offsets[i]:offsets[i+1]`."""
    token_acts = np.asarray(token_acts)
    offsets = np.asarray(offsets)
    lengths = np.diff(offsets)
    if (lengths <= 0).any():
        raise ValueError("query_max: every query needs at least one token")
    if offsets[0] != 0 or offsets[-1] != len(token_acts):
        raise ValueError(f"query_max: offsets must run from 0 to the token count {len(token_acts)}")
    return np.maximum.reduceat(token_acts, offsets[:-1], axis=0)
