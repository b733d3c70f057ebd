"""Request and response models of the JSON API (what `/docs` shows)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator

from app.steering import MAX_INTERVENTIONS, STRICT, ConditionIn, InterventionIn, check_unique

# Hard limits of the schema; the server's options may be stricter (checked in the routes).
MAX_NEW_TOKENS = 4096
MAX_CHARS = 64_000
MAX_NAME = 200  # SAE set references, domain names
SetRef = Annotated[str | None, Field(max_length=MAX_NAME, description="SAE set id or name; default: the live set.")]


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CHARS)


class GenerationParams(BaseModel):
    model_config = STRICT

    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    sae_set: SetRef = None


class ChatRequest(GenerationParams):
    messages: list[Message] = Field(min_length=1, max_length=256)
    domains: list[Annotated[str, StringConstraints(max_length=MAX_NAME)]] | None = Field(
        default=None, max_length=64,
        description="Only features tagged with one of these domains count (default: all counted features).",
    )
    top_n: int = Field(default=12, ge=1, le=64, description="Features listed per token.")
    stop_when: ConditionIn | None = Field(
        default=None, description="End the answer at the first generated token where this feature fires above the value "
        '(`finish_reason: "feature"`, `stopped_at` names the token).'
    )


class SteerRequest(GenerationParams):
    messages: list[Message] = Field(min_length=1, max_length=256)
    interventions: list[InterventionIn] = Field(min_length=1, max_length=MAX_INTERVENTIONS)
    top_n: int = Field(default=8, ge=1, le=64)
    stop_when: ConditionIn | None = Field(default=None, description="As for /api/chat; applies to both answers.")
    cost: bool = Field(default=True, description="Measure the edit's capability cost (seconds the first time, then cached).")

    @field_validator("interventions")
    @classmethod
    def _unique(cls, value: list[InterventionIn]) -> list[InterventionIn]:
        return check_unique(value)


class TraceRequest(BaseModel):
    model_config = STRICT

    prompt: str = Field(min_length=1, max_length=MAX_CHARS)
    answer: str | None = Field(
        default=None, min_length=1, max_length=MAX_CHARS,
        description="The assistant's answer, traced after the prompt: its words count as content, so the refusal "
                    "features show where the model refuses. The refusal probability stays the one at the prompt's end.",
    )
    chat_template: bool = Field(default=True, description="Wrap the prompt as a user turn of the chat template.")
    sae_set: SetRef = None
    only_safety: bool = Field(default=True, description="Only safety-tagged features (else every counted feature).")
    top_n: int = Field(default=6, ge=1, le=32, description="Features per layer in the chain.")


class CompareRequest(BaseModel):
    model_config = STRICT

    prompt_a: str = Field(min_length=1, max_length=MAX_CHARS)
    prompt_b: str = Field(min_length=1, max_length=MAX_CHARS)
    chat_template: bool = Field(default=True)
    sae_set: SetRef = None
    only_safety: bool = Field(default=True)
    top_n: int = Field(default=6, ge=1, le=32)
    n_differences: int = Field(default=30, ge=1, le=200)


class PresetIn(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=120, pattern=r"^[\w .:+-]+$")
    sae_set: SetRef = None
    interventions: list[InterventionIn] = Field(min_length=1, max_length=MAX_INTERVENTIONS)

    @field_validator("interventions")
    @classmethod
    def _unique(cls, value: list[InterventionIn]) -> list[InterventionIn]:
        return check_unique(value)


# Responses


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is: [\"body\"|\"query\"|\"path\"|\"header\", field, ...].")
    msg: str
    type: str


class ErrorOut(BaseModel):
    detail: list[ErrorItem] | str


class FeatureSummary(BaseModel):
    id: str
    layer: int
    index: int
    explanation: str | None
    explainer: str | None
    score: float | None
    score_method: str | None
    domains: list[str]
    is_safety: bool


class SetOut(BaseModel):
    id: int
    name: str
    model: str
    origin: str
    hook_kind: str
    k: int
    d_sae: int
    layers: list[int]
    n_features: int
    n_explained: int
    live: bool
    live_error: str | None
    overlay_note: str | None


class HealthOut(BaseModel):
    status: Literal["ok"]
    model: str | None
    model_error: str | None
    sets: list[SetOut]
    queue: dict


class FeatureListOut(BaseModel):
    sae_set: int
    offset: int
    limit: int
    has_more: bool
    items: list[FeatureSummary]


class Neighbour(BaseModel):
    id: str
    cosine: float
    explanation: str | None
    domains: list[str]


class FeatureOut(FeatureSummary):
    sae_set: SetOut
    density: float | None
    max_activation: float | None
    normaliser: float | None
    quantiles: dict | None
    histogram: dict | None
    top_tokens: list | None
    bottom_tokens: list | None
    umap: list[float] | None
    candidate_only: bool
    explanations: list[dict]
    concepts: list[dict]
    domain_sources: list[dict]
    examples: list[dict]
    neighbours: list[Neighbour] | None = Field(description="Nearest features by decoder cosine (same layer); null without checkpoints.")
    neighbours_error: str | None
    refusal_cosine: float | None = Field(description="Cosine of the decoder direction with its layer's refusal direction "
                                         "(refused minus answered); null without one.")
    refusal_cosine_share: float | None = Field(description="Share of the layer's features with a cosine at least as high.")


class MapColumns(BaseModel):
    id: list[str]
    x: list[float]
    y: list[float]
    layer: list[int]
    domains: list[list[str]]
    score: list[float | None]
    explanation: list[str]


class MapOut(BaseModel):
    sae_set: dict
    projection: str
    n_explained: int
    layers: list[int]
    domains: list[str]
    n: int
    features: MapColumns


class TokenOut(BaseModel):
    id: int
    text: str
    special: bool
    role: str
    turn: int
    content: bool = Field(description="The token carries a user's or the answer's words; template and system-prompt tokens are never counted.")
    tint: float = Field(description="Strongest normalised activation of a counted feature (0 on non-content tokens).")
    top: list[tuple[str, float]]


class RunOut(BaseModel):
    text: str
    finish_reason: Literal["eos", "length", "feature"]
    stopped_at: int | None = Field(description="The token where `stop_when` fired (finish_reason `feature`).")
    prompt: list[TokenOut]
    response: list[TokenOut]
    tracked: dict[str, list[float]] = Field(
        description="Activation of each steered feature per token (prompt then response), re-encoded from the edited activations."
    )
    tracked_units: dict[str, Literal["normalised", "raw"]] = Field(
        description="normalised where the feature has a normaliser, else raw."
    )


class CostOut(BaseModel):
    ce: float = Field(description="Mean next-token cross-entropy (nats) on fixed benign texts under the edit.")
    ce_increase: float = Field(description="`ce` minus the unsteered model's.")
    benign_refusal: float = Field(description="Share of fixed benign prompts the steered model refuses.")
    baseline_refusal: float = Field(description="The unsteered model's share on the same prompts.")


class SteerOut(BaseModel):
    sae_set: int
    seed: int
    interventions: list[InterventionIn]
    default: RunOut
    steered: RunOut
    cost: CostOut | None = Field(description="What the edit costs the model (null when not asked for).")
    features: dict[str, FeatureSummary]


class ChainFeature(BaseModel):
    id: str
    max: float
    peak_token: int
    activations: list[float]


class ChainLayer(BaseModel):
    layer: int
    features: list[ChainFeature]


class RefusalStage(BaseModel):
    probability: float = Field(description="The model's probability that its answer opens with a refusal (first answer token).")
    features: list[ChainFeature] = Field(description="The refusal-tagged features, strongest first.")


class Reason(BaseModel):
    id: str = Field(description='The SAE feature "{layer}_{index}".')
    contribution: float = Field(description="What the feature adds to the probe's logit: activation x (w . W_dec[f]).")
    activation: float = Field(description="Its raw activation (averaged over the turn for a mean probe).")


class ProbeRisk(BaseModel):
    p: float = Field(description="Calibrated probability that the prompt belongs to the domain.")
    logit: float
    layer: int
    representation: Literal["mean", "last"]
    reasons: list[Reason] = Field(description="The SAE features that add most to the logit, largest first.")


class MonitorOut(BaseModel):
    probe: dict[str, ProbeRisk] = Field(description="Per domain (and `any`): the dense probe's risk and its reasons.")
    ksparse: dict[str, float] = Field(description="Per domain (and `any`): the k-sparse SAE probe's probability.")


class TraceOut(BaseModel):
    sae_set: int
    tokens: list[dict] = Field(description="Each token's id, text, role, turn and `content` flag.")
    layers: list[int]
    grid: list[list[float]] = Field(description="[layer][token] strongest normalised activation (0 on non-content tokens)")
    grid_features: list[list[str | None]]
    chain: list[ChainLayer] = Field(description="Per layer, the strongest features over the content tokens.")
    refusal: RefusalStage = Field(description="The last stage of the chain: refusal.")
    domains: dict[str, float] = Field(
        description="Per tagged domain, the strongest normalised activation of its features on the content tokens."
    )
    monitor: MonitorOut | None = Field(description="The set's monitors on this prompt (null when it has none).")
    features: dict[str, FeatureSummary]


class Difference(BaseModel):
    id: str
    a: float
    b: float
    difference: float


class CompareOut(BaseModel):
    a: TraceOut
    b: TraceOut
    differences: list[Difference]
    features: dict[str, FeatureSummary]


class PresetOut(BaseModel):
    name: str
    sae_set: int
    interventions: list[InterventionIn]
    description: str | None = Field(default=None, description="What the preset does (the flip search writes one).")
    figures: dict[str, float | int | None] | None = Field(
        default=None,
        description="Measured figures: the flip search's rate on its search prompts, and the edit's capability cost "
        "(ce_increase on benign texts, benign_refusal).",
    )
    example: str | None = Field(default=None, description="A prompt on which the preset changes the decision.")
