"""Steering requests: the intervention model of the API, its limits, and turning it into edits."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sae_engine.inference import DIRECTION_MODES, Condition, Intervention

FEATURE_ID = re.compile(r"^(\d{1,4})_(\d{1,9})$")
FEATURE_ID_PATTERN = FEATURE_ID.pattern
MAX_INTERVENTIONS = 16
# Requests are validated strictly: JSON true is not the integer 1, nor 0 the boolean false; and an unknown
# field is refused, not ignored (`max_tokens` for `max_new_tokens` would otherwise silently fall back to the default).
STRICT = ConfigDict(strict=True, extra="forbid")

# Slider ranges per mode: clamp and add in normalised units (1.0 = the feature's ~0.999 quantile);
# direction_add in units of the layer's refusal direction (1.0 = refused minus answered, on average).
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "clamp": (0.0, 50.0),
    "scale": (-10.0, 10.0),
    "ablate": (0.0, 0.0),
    "add": (-50.0, 50.0),
    "direction_ablate": (0.0, 0.0),
    "direction_add": (-4.0, 4.0),
}
FIXED_VALUE = ("ablate", "direction_ablate")


class ConditionIn(BaseModel):
    """Act only at the positions where this feature's normalised activation exceeds `above`."""

    model_config = STRICT

    feature: str = Field(pattern=FEATURE_ID_PATTERN, description='Feature id "{layer}_{index}" (same or earlier layer).')
    above: float = Field(ge=0.0, le=50.0, description="Threshold in normalised units.")

    @property
    def layer(self) -> int:
        return int(FEATURE_ID.match(self.feature).group(1))

    def engine(self) -> Condition:
        return Condition(self.layer, int(FEATURE_ID.match(self.feature).group(2)), self.above)


class InterventionIn(BaseModel):
    """One feature (or one layer's refusal direction) to steer. `value` is ignored (0) for the ablate modes."""

    model_config = STRICT

    feature: str | None = Field(
        default=None, pattern=FEATURE_ID_PATTERN, description='Feature id "{layer}_{index}" (feature modes).', examples=["14_1207"]
    )
    layer: int | None = Field(default=None, ge=0, le=1024, description="The hooked layer whose refusal direction the direction modes use.")
    mode: Literal["clamp", "scale", "ablate", "add", "direction_ablate", "direction_add"] = Field(
        description="clamp: set the activation to `value` normalised units; scale: multiply it by `value`; "
        "ablate: set it to 0; add: add `value` normalised units of the decoder direction; direction_ablate: project "
        "the layer's refusal direction out of its activation; direction_add: add `value` times that direction."
    )
    value: float = Field(default=0.0, description=f"Slider value; ranges per mode: {VALUE_RANGES}.")
    scope: Literal["prompt", "response", "both"] = "both"
    when: ConditionIn | None = Field(default=None, description="Act only where this feature fires above a threshold.")

    @model_validator(mode="after")
    def _target_and_range(self) -> InterventionIn:
        direction = self.mode in DIRECTION_MODES
        if direction and (self.layer is None or self.feature is not None):
            raise ValueError(f"mode {self.mode} needs `layer` (the refusal direction's layer) and no `feature`")
        if not direction and (self.feature is None or self.layer is not None):
            raise ValueError(f"mode {self.mode} needs `feature` and no `layer`")
        if self.when is not None and self.when.layer > self.hooked_layer:
            raise ValueError(f"when.feature {self.when.feature} is after layer {self.hooked_layer}: a condition must come "
                             "from the same or an earlier layer")
        if self.mode in FIXED_VALUE:
            self.value = 0.0
            return self
        low, high = VALUE_RANGES[self.mode]
        if not low <= self.value <= high:
            raise ValueError(f"value {self.value} is outside the {self.mode} range [{low}, {high}]")
        return self

    @property
    def hooked_layer(self) -> int:
        return self.layer if self.feature is None else int(FEATURE_ID.match(self.feature).group(1))

    @property
    def index(self) -> int:
        return -1 if self.feature is None else int(FEATURE_ID.match(self.feature).group(2))

    @property
    def key(self) -> str:
        return self.feature or f"{self.layer}_direction"

    def engine(self) -> Intervention:
        when = self.when.engine() if self.when is not None else None
        return Intervention(self.hooked_layer, self.index, self.mode, self.value, self.scope, when)


def check_unique(interventions: list[InterventionIn]) -> list[InterventionIn]:
    seen: set[str] = set()
    for item in interventions:
        if item.key in seen:
            raise ValueError(f"{item.key} appears more than once; each intervention acts once")
        seen.add(item.key)
    return interventions
