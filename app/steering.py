"""Steering requests: the intervention model of the API, its limits, and turning it into edits."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_engine.inference import Intervention

FEATURE_ID = re.compile(r"^(\d{1,4})_(\d{1,9})$")
FEATURE_ID_PATTERN = FEATURE_ID.pattern
MAX_INTERVENTIONS = 16
# Requests are validated strictly: JSON true is not the integer 1, nor 0 the boolean false; and an unknown
# field is refused, not ignored (`max_tokens` for `max_new_tokens` would otherwise silently fall back to the default).
STRICT = ConfigDict(strict=True, extra="forbid")

# Slider ranges per mode: clamp and add in normalised units (1.0 = the feature's ~0.999 quantile).
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "clamp": (0.0, 50.0),
    "scale": (-10.0, 10.0),
    "ablate": (0.0, 0.0),
    "add": (-50.0, 50.0),
}


class InterventionIn(BaseModel):
    """One feature to steer. `value` is ignored (0) for ablate."""

    model_config = STRICT

    feature: str = Field(pattern=FEATURE_ID_PATTERN, description='Feature id "{layer}_{index}".', examples=["14_1207"])
    mode: Literal["clamp", "scale", "ablate", "add"] = Field(
        description="clamp: set the activation to `value` normalised units; scale: multiply it by `value`; "
        "ablate: set it to 0; add: add `value` normalised units of the decoder direction."
    )
    value: float = Field(default=0.0, description=f"Slider value; ranges per mode: {VALUE_RANGES}.")
    scope: Literal["prompt", "response", "both"] = "both"

    @model_validator(mode="after")
    def _in_range(self) -> InterventionIn:
        if self.mode == "ablate":
            self.value = 0.0
            return self
        low, high = VALUE_RANGES[self.mode]
        if not low <= self.value <= high:
            raise ValueError(f"value {self.value} is outside the {self.mode} range [{low}, {high}]")
        return self

    @property
    def layer(self) -> int:
        return int(FEATURE_ID.match(self.feature).group(1))

    @property
    def index(self) -> int:
        return int(FEATURE_ID.match(self.feature).group(2))

    def engine(self) -> Intervention:
        return Intervention(self.layer, self.index, self.mode, self.value, self.scope)


def check_unique(interventions: list[InterventionIn]) -> list[InterventionIn]:
    seen: set[str] = set()
    for item in interventions:
        if item.feature in seen:
            raise ValueError(f"feature {item.feature} appears more than once; each intervention acts once")
        seen.add(item.feature)
    return interventions
