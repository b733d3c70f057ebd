"""The capability cost of steering settings (`sae_engine.capability`), computed once per setting and kept.

The unsteered baseline is measured on first use; each setting's cost costs one pass over the benign texts and a
few tokens on the benign prompts (seconds on a CPU), so the last `MAX_ENTRIES` settings are remembered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor

from sae_engine.capability import steering_cost, unsteered_baseline
from sae_engine.inference import Intervention, SAEBundle
from sae_engine.models import LoadedModel

MAX_ENTRIES = 64


class CostCache:
    def __init__(self) -> None:
        self.baseline: tuple[float, float] | None = None
        self.entries: OrderedDict[tuple[Intervention, ...], dict] = OrderedDict()

    def cost(self, model: LoadedModel, bundle: SAEBundle, interventions: Sequence[Intervention],
             directions: Mapping[int, Tensor]) -> dict:
        key = tuple(interventions)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if self.baseline is None:
            self.baseline = unsteered_baseline(model)
        value = steering_cost(model, bundle, interventions, directions, self.baseline).as_dict()
        self.entries[key] = value
        if len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)
        return value
