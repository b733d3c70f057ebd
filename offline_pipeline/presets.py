"""Pipeline presets: everything a run depends on, as frozen dataclasses (hashed into the stage keys).

- `quick`: the embedded Qwen2.5-Coder-0.5B-Instruct on CPU, 160k SAE training tokens per layer, the config sweep
  on the middle layer. Runs end to end on 2 CPU cores.
- `paper`: Qwen2.5-3B-Instruct (Hub id or local path) on CUDA in bf16, the paper's SAE (TopK k = 200,
  expansion 10, MLP outputs) pinned, a wider sweep, large batches, SAE training streamed from the model
  instead of an activation cache.
- `tiny`: a tiny random Llama (built once into the data directory, with the real SmolLM2
  tokenizer) on a small slice of the corpus: exercises every stage in seconds (tests).

A preset names its own model, which `--model` / `STARMAP_MODEL` replaces for every preset. Unless a preset
fixes its layers, it hooks the paper's relative depths (layers 0, 8, 17, 26, 35 of 36) scaled to the model's
layer count (`sae_engine.models.layer_preset`); `for_model` resolves both before any stage runs, with the
device and dtype that "auto" means on this machine, so the stage keys hash the concrete model, layers and
precision: a data directory resumed on a CPU without bf16 (which runs in fp32) does not reuse stages computed
in bf16, whose features differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from offline_pipeline.candidate_filter import FilterConfig
from offline_pipeline.feature_map import MapConfig
from offline_pipeline.flip_search import FlipConfig
from offline_pipeline.monitor import MonitorConfig
from sae_engine.models import TINY_MODEL


@dataclass(frozen=True)
class CorpusPreset:
    # Per (split, domain) caps on records and on contrastive pairs (None: all); they keep a slice balanced.
    max_records_per_group: int | None = None
    max_pairs_per_group: int | None = None
    # Per-domain caps, (domain, records per (split, domain)), for the train split and for each held-out split:
    # they bound the cost of a run where a domain's sources are large (benign text, jailbreak templates).
    train_caps: tuple[tuple[str, int], ...] = ()
    query_caps: tuple[tuple[str, int], ...] = ()
    # Chat records (prompt in the chat template + the model's answer, generated once and cached) for
    # this many prompts, balanced over (split, domain); 0 for none.
    chat_prompts: int = 0
    # The project's harmful prompts (`harmful_prompts.jsonl`) join the corpus; a run small enough to test the
    # pipeline's structure keeps its few records per group for the public sources its checks were written on.
    project_harmful: bool = True
    # Prompts of these splits get refusal labels from the opening of the model's answer.
    refusal_label_splits: tuple[str, ...] = ("filter", "score")
    # Chat records (prompt + the answer's opening) for this many labelled prompts, half refused: the filter
    # finds the refusal features on them. 0: refusal features are sought on the prompts' own words.
    refusal_openings: int = 0
    max_tokens_per_record: int = 256  # training records
    max_query_tokens: int = 128  # filter / explain / score records
    seed: int = 0


class PresetError(ValueError):
    """A preset cannot run on the chosen model; the message says why."""


@dataclass(frozen=True)
class SweepPreset:
    layers: tuple[int, ...] | None = None  # None: the layers at `depths` of the model
    depths: tuple[float, ...] = (17 / 35,)  # the paper's middle layer
    hook_kinds: tuple[str, ...] = ("mlp_out", "resid_post")
    ks: tuple[int, ...] = (16, 32, 64, 128, 200)
    train_tokens: int = 100_000
    thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    reference_threshold: float = 0.3
    probe_k: int = 8
    max_fvu: float = 0.6  # configs reconstructing worse than this are not eligible


@dataclass(frozen=True)
class TrainPreset:
    expansion_factor: int = 10
    batch_size: int = 4096
    train_tokens: int = 200_000  # tokens per SAE (epochs over the cached training tokens as needed)
    lr: float | None = None
    dead_after_tokens: int = 100_000
    from_cache: bool = True  # False: stream from the model (MultiSAETrainer), one pass trains every layer
    stream_batch_rows: int = 32  # rows per model batch when streaming
    eval_rows: int = 8  # rows of the explain split for the spliced cross-entropy metrics
    seed: int = 0


@dataclass(frozen=True)
class StatsPreset:
    examples_per_level: int = 6
    n_output_tokens: int = 10
    quantile: float = 0.999


@dataclass(frozen=True)
class ExplainPreset:
    n_per_side: int = 5  # held-out activating and non-activating queries per feature
    n_random_negatives: int = 8
    n_hard_negatives: int = 8
    methods: tuple[str, ...] = ("sls", "tls")
    min_score: float = 0.2  # below: explained but not tagged as a safety feature (the release's cut)


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    layers: tuple[int, ...] | None = None  # None: the paper's five relative depths of the model
    device: str = "auto"
    dtype: str = "auto"
    collect_batch_tokens: int = 8192
    corpus: CorpusPreset = field(default_factory=CorpusPreset)
    sweep: SweepPreset | None = None
    pinned: tuple[str, int] | None = None  # (hook kind, k) fixed by the preset instead of the sweep's rule
    train: TrainPreset = field(default_factory=TrainPreset)
    stats: StatsPreset = field(default_factory=StatsPreset)
    filter: FilterConfig = field(default_factory=FilterConfig)
    explain: ExplainPreset = field(default_factory=ExplainPreset)
    map: MapConfig = field(default_factory=MapConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    filter_languages: tuple[str, ...] = ("en",)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_key(self) -> str:
        return f"{self.name}-{self.digest()}"

    def hook_kinds(self) -> tuple[str, ...]:
        """Every hook kind a final SAE set could use (the sweep's, or the pinned one)."""
        if self.pinned:
            return (self.pinned[0],)
        return self.sweep.hook_kinds if self.sweep else ("mlp_out",)


QUICK = Preset(
    name="quick",
    model="qwen2.5-coder-0.5b",
    device="cpu",
    # ~390k tokens (263k computed) through a 0.5B model on 2 CPU cores with AVX512-BF16 (~400 tokens/s; ~140 in
    # fp32 on a CPU without bf16, where the run takes about an hour): the caps aim at 30 minutes.
    # The benign cap (1,250, with every project prompt on top) pays for the project's harmful prompts.
    corpus=CorpusPreset(
        chat_prompts=32,
        max_tokens_per_record=128,
        train_caps=(("benign", 1250), ("other", 150), ("hate", 600)),
        query_caps=(("benign", 450), ("other", 40), ("hate", 150)),
        refusal_label_splits=("filter",),
        refusal_openings=300,
    ),
    # Smaller k never wins on these data (fewer concept-separating features): the sweep compares k = 64 and 200.
    sweep=SweepPreset(ks=(64, 200), train_tokens=60_000),
    # Small batches and a high learning rate: a short run has few steps to converge in.
    train=TrainPreset(batch_size=1024, lr=2e-3, train_tokens=160_000),
    # SAEs trained on 160k tokens have broad features: "fires" means as strong as the feature's top 0.1%.
    # Precision at equal priors, and a safety feature stays off 99% of benign prompts: chosen on the corpus's
    # score split over plain precision 0.6-0.9 and balanced 0.8-0.99 (the frequent features' false alarms add
    # up in a max-of-features monitor; plain precision grew stricter for small domains as benign tests grew).
    # A domain left blank at 0.97 (hate, self-harm) takes its features at 0.9 (on the score split: hate 0.50 -> 0.87,
    # self-harm 0.50 -> 0.74, all domains 0.751 -> 0.765); each domain keeps at most 10 features, those a forward
    # selection picks for the best max-of-features detectors on the filter's queries (on the score split, all
    # domains 0.793 -> 0.815 and look-alikes 0.785 -> 0.820 against the 10 most precise; held out, all domains
    # 0.833 -> 0.854 but 3 of 7 domains >= 0.85 instead of 5, bench/RESULTS.md "sixth run").
    filter=FilterConfig(
        tau=1.0, min_precision=0.97, min_recall=0.1, min_hits=3, max_benign_share=0.01, balanced=True,
        fallback_precision=0.9, max_per_domain=10, min_detector_gain=0.001,
    ),
    # More held-out queries: with 5 per side a feature's trigger words are often absent from all of them.
    explain=ExplainPreset(n_per_side=8),
)

PAPER = Preset(
    name="paper",
    model="Qwen/Qwen2.5-3B-Instruct",
    device="cuda",
    dtype="bfloat16",
    collect_batch_tokens=65_536,
    corpus=CorpusPreset(chat_prompts=4000, max_tokens_per_record=512, max_query_tokens=256),
    sweep=SweepPreset(depths=(8 / 35, 17 / 35, 26 / 35), ks=(16, 32, 64, 128, 200, 256), train_tokens=2_000_000),
    pinned=("mlp_out", 200),
    train=TrainPreset(
        batch_size=4096, train_tokens=8_000_000, dead_after_tokens=2_000_000, from_cache=False, stream_batch_rows=128, eval_rows=64
    ),
    stats=StatsPreset(examples_per_level=10),
)

TINY = Preset(
    name="tiny",
    model=TINY_MODEL,
    layers=(0, 1, 2, 3),
    device="cpu",
    dtype="float32",
    collect_batch_tokens=4096,
    corpus=CorpusPreset(
        max_records_per_group=40,
        max_pairs_per_group=6,
        max_tokens_per_record=64,
        max_query_tokens=64,
        project_harmful=False,
        refusal_openings=16,
    ),
    sweep=SweepPreset(layers=(2,), ks=(8, 16), train_tokens=4_000, probe_k=4, max_fvu=0.8),
    train=TrainPreset(expansion_factor=4, batch_size=512, train_tokens=8_000, dead_after_tokens=4_000, eval_rows=2),
    stats=StatsPreset(examples_per_level=3, n_output_tokens=5),
    # A random model's features are broad: only strong activations are selective enough to pass.
    filter=FilterConfig(tau=1.0, min_precision=0.4, min_recall=0.1, min_hits=2),
    explain=ExplainPreset(n_per_side=3, n_random_negatives=4, n_hard_negatives=4, min_score=0.0),
    map=MapConfig(n_neighbors=5),
    flip=FlipConfig(n_search=4, answer_tokens=4, per_layer=1),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (QUICK, PAPER, TINY)}


def for_model(preset: Preset, model: str | None, data_dir: Path) -> Preset:
    """The preset on `model` (None: the preset's own), with the model's concrete layers, device and dtype.

    A model that cannot be found, or has fewer layers than the preset hooks, is a `PresetError`.
    """
    from sae_engine.models import ModelLoadError, layer_preset, model_config, resolve_device, resolve_dtype

    name = model or preset.model
    try:
        _, config = model_config(name, data_dir)
    except ModelLoadError as exc:
        raise PresetError(str(exc)) from None
    n_layers = config.num_hidden_layers
    layers = preset.layers or layer_preset(n_layers)
    sweep = preset.sweep and replace(preset.sweep, layers=preset.sweep.layers or layer_preset(n_layers, preset.sweep.depths))
    asked = sorted({*layers, *(sweep.layers if sweep else ())})
    outside = [layer for layer in asked if not 0 <= layer < n_layers]
    if outside:
        raise PresetError(
            f"model {name!r} has {n_layers} layers (0-{n_layers - 1}); preset {preset.name!r} hooks layer(s) {outside}"
        )
    device = resolve_device(preset.device)
    dtype = str(resolve_dtype(preset.dtype, device)).removeprefix("torch.")
    return replace(preset, model=name, layers=layers, sweep=sweep, device=str(device), dtype=dtype)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
