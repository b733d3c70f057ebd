"""The 2-D neuron map: UMAP of SAE decoder directions under the cosine metric.

Two features sit close on the map when their decoder rows point the same way in the model's
activation space, i.e. when they write the same thing into the hooked activation. Features of
different layers live in different spaces (each layer's stream has its own basis), so the map
embeds all of them together only as a visual overview; distance is meaningful within a layer and
approximate across layers. The projection is deterministic: UMAP with a fixed `random_state`
(which also makes it single-threaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAP_DESCRIPTION = "UMAP (cosine metric) of SAE decoder directions, seed {seed}"


@dataclass(frozen=True)
class MapConfig:
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0

    @property
    def description(self) -> str:
        return MAP_DESCRIPTION.format(seed=self.seed)


def decoder_map(directions: np.ndarray, config: MapConfig = MapConfig()) -> np.ndarray:
    """(n, 2) coordinates for `directions` (n, d_in); n >= 3."""
    directions = np.asarray(directions, dtype=np.float32)
    if directions.ndim != 2 or len(directions) < 3:
        raise ValueError(f"a map needs at least 3 directions as an (n, d_in) array, got shape {directions.shape}")
    if not np.isfinite(directions).all():
        raise ValueError("decoder directions contain non-finite values")
    import umap  # imported here: umap-learn compiles numba code on import (seconds)

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(config.n_neighbors, len(directions) - 1),
        min_dist=config.min_dist,
        metric="cosine",
        random_state=config.seed,
        n_jobs=1,  # a fixed random_state makes UMAP single-threaded anyway; saying so silences its warning
        init="spectral" if len(directions) > config.n_neighbors + 1 else "random",
    )
    coords = reducer.fit_transform(directions)
    return np.asarray(coords, dtype=np.float64)
