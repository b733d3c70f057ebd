"""Import the public Safe-SAIL release (Qwen2.5-3B-Instruct SAE features) into the StarMap database.

What the release files become:

- `en_db.json` (authoritative; `{"{layer}_{index}": {"explanation", "correlation_score", "tag_list"}}`):
  one feature per entry, an English explanation (explainer `release`, explainer_model `Safe-SAIL`)
  unless the entry's explanation is null, a score (method `release`, value = correlation_score,
  simulator `Safe-SAIL`) on each explanation, one `feature_domains` row (source `release`) per tag,
  and `is_safety = True` for tagged features.
- `cn_db.json` (`--db-zh`): Chinese explanations (language `zh`) of the same features, each with the
  same release score. Scores and tags come from the English file. A Chinese entry whose key the
  English file lacks is skipped and reported (the release has one: `17_12046`), so that the
  features and tags stay the release's 4,700 / 1,758.
- `indices_layer{L}.pt` (`--indices`): the candidate ids of each layer. Candidates without a database
  entry become features with `candidate_only = True` and no explanation.
- `ckpt_layer{L}.pt` (`--checkpoints`): recorded as each SAE's `checkpoint_path` (must exist).
- `quantiles_layer{L}.pt` (`--quantiles`): the per-feature normalisers (the ~0.999 activation
  quantile). The release does not publish their file format; we read a `torch.load`able 1-D float
  tensor of length d_sae (20,480) per layer, indexed by feature index. Without it `normaliser` is NULL.

The import mirrors its sources: it upserts by natural keys (model name; set name; hook name; feature
id; feature + language; explanation; feature + domain), deletes rows of the set that the sources no
longer contain, and leaves every unchanged row untouched, so importing twice changes nothing. It
runs inside the caller's transaction: a failure leaves the database as it was.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from starmap.db.models import (
    Domain,
    Explanation,
    Feature,
    FeatureDomain,
    Model,
    Sae,
    SaeSet,
    Score,
)

MODEL_NAME = "Qwen/Qwen2.5-3B-Instruct"
MODEL_N_LAYERS = 36
MODEL_D_MODEL = 2048
MODEL_SOURCE = "hub"
SET_NAME = "safe-sail"
ORIGIN = "safe-sail"
HOOK_KIND = "mlp_out"
K = 200
EXPANSION = 10
D_SAE = MODEL_D_MODEL * EXPANSION
EXPLAINER = "release"
EXPLAINER_MODEL = "Safe-SAIL"
SCORE_METHOD = "release"
SIMULATOR = "Safe-SAIL"
TAG_SOURCE = "release"

_KEY = re.compile(r"^(\d+)_(\d+)$")
_INDICES_FILE = re.compile(r"^indices_layer(\d+)\.pt$")
_CHUNK = 5000


class SafeSailImportError(ValueError):
    """Bad or missing release input; the message names the file (and entry or option)."""


@dataclass(frozen=True)
class ReleaseEntry:
    layer: int
    index: int
    explanation: str | None
    score: float
    tags: tuple[str, ...]


@dataclass(frozen=True)
class SafeSailSources:
    en_db: Path
    zh_db: Path | None = None
    indices_dir: Path | None = None
    checkpoints_dir: Path | None = None
    quantiles_dir: Path | None = None


@dataclass
class ImportSummary:
    sae_set_id: int
    layers: list[int]
    features: int
    candidate_features: int
    explanations: dict[str, int]
    scores: int
    tagged_features: int
    domain_counts: dict[str, int]
    en_without_explanation: list[str]
    zh_only_skipped: list[str]
    changes: dict[str, Counter] = field(default_factory=dict)

    @property
    def changed_rows(self) -> int:
        return sum(sum(counter.values()) for counter in self.changes.values())


# ---------------------------------------------------------------- reading the release files


def read_release_db(path: Path) -> dict[str, ReleaseEntry]:
    """Parse and validate one release database JSON file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafeSailImportError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SafeSailImportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise SafeSailImportError(
            f"{path}: expected a JSON object keyed '{{layer}}_{{index}}', got {type(raw).__name__}"
        )
    return {key: _parse_entry(path, key, value) for key, value in raw.items()}


def _parse_entry(path: Path, key: str, value: Any) -> ReleaseEntry:
    def bad(message: str) -> SafeSailImportError:
        return SafeSailImportError(f"{path}: entry {key!r}: {message}")

    match = _KEY.match(key)
    if not match or key != f"{int(match[1])}_{int(match[2])}":
        raise bad("key is not '{layer}_{index}'")
    layer, index = int(match[1]), int(match[2])
    if layer >= MODEL_N_LAYERS:
        raise bad(f"layer {layer} is beyond the model's {MODEL_N_LAYERS} layers")
    if index >= D_SAE:
        raise bad(f"feature index {index} is beyond d_sae = {D_SAE}")
    if not isinstance(value, dict):
        raise bad(f"expected an object, got {type(value).__name__}")
    for name in ("explanation", "correlation_score", "tag_list"):
        if name not in value:
            raise bad(f"missing {name!r}")
    explanation = value["explanation"]
    if explanation is not None and not isinstance(explanation, str):
        raise bad(f"'explanation' must be a string or null, got {type(explanation).__name__}")
    score = value["correlation_score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise bad(f"'correlation_score' must be a finite number, got {score!r}")
    if not -1.0 <= score <= 1.0:
        raise bad(f"'correlation_score' {score} is not a correlation in [-1, 1]")
    tags = value["tag_list"]
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag.strip() for tag in tags):
        raise bad(f"'tag_list' must be a list of domain names, got {tags!r}")
    return ReleaseEntry(layer, index, explanation, float(score), tuple(dict.fromkeys(t.strip() for t in tags)))


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SafeSailImportError(f"{path}: file not found ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as error:
        raise SafeSailImportError(f"{path}: cannot be read by torch.load ({what}): {error}") from None


def read_indices(folder: Path, required_layers: Iterable[int]) -> dict[int, set[int]]:
    """The candidate feature ids per layer from `indices_layer{L}.pt` (1-D integer tensors)."""
    if not folder.is_dir():
        raise SafeSailImportError(f"{folder}: --indices folder not found")
    files = {int(m[1]): folder / m[0] for m in (_INDICES_FILE.match(p.name) for p in folder.iterdir()) if m}
    if not files:
        raise SafeSailImportError(f"{folder}: no indices_layer{{L}}.pt files (--indices)")
    for layer in required_layers:
        if layer not in files:
            raise SafeSailImportError(
                f"{folder / f'indices_layer{layer}.pt'}: file not found (--indices, layer {layer})"
            )
    indices: dict[int, set[int]] = {}
    for layer, path in sorted(files.items()):
        if layer >= MODEL_N_LAYERS:
            raise SafeSailImportError(f"{path}: layer {layer} is beyond the model's {MODEL_N_LAYERS} layers")
        tensor = _torch_load(path, "--indices")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1 or tensor.dtype.is_floating_point:
            raise SafeSailImportError(f"{path}: expected a 1-D integer tensor of feature ids")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= D_SAE):
            raise SafeSailImportError(f"{path}: feature ids must lie in [0, {D_SAE})")
        indices[layer] = set(tensor.tolist())
    return indices


def read_normalisers(folder: Path, layers: Iterable[int]) -> dict[int, list[float]]:
    """Per-layer normalisers from `quantiles_layer{L}.pt`: 1-D float tensors of length d_sae."""
    if not folder.is_dir():
        raise SafeSailImportError(f"{folder}: --quantiles folder not found")
    normalisers = {}
    for layer in layers:
        path = folder / f"quantiles_layer{layer}.pt"
        tensor = _torch_load(path, f"--quantiles, layer {layer}")
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (D_SAE,) or not tensor.dtype.is_floating_point:
            raise SafeSailImportError(
                f"{path}: expected a 1-D float tensor of length {D_SAE} (one normaliser per feature)"
            )
        normalisers[layer] = tensor.double().tolist()
    return normalisers


def checkpoint_paths(folder: Path, layers: Iterable[int]) -> dict[int, str]:
    paths = {}
    for layer in layers:
        path = folder / f"ckpt_layer{layer}.pt"
        if not path.is_file():
            raise SafeSailImportError(f"{path}: file not found (--checkpoints, layer {layer})")
        paths[layer] = str(path.resolve())
    return paths


# ---------------------------------------------------------------- writing


def import_safe_sail(session: Session, sources: SafeSailSources) -> ImportSummary:
    """Bring the Safe-SAIL SAE set in the database in line with `sources` (inside the session's transaction)."""
    en = read_release_db(sources.en_db)
    zh = read_release_db(sources.zh_db) if sources.zh_db else {}
    en_layers = sorted({entry.layer for entry in en.values()})
    indices = read_indices(sources.indices_dir, en_layers) if sources.indices_dir else {}
    layers = sorted(set(en_layers) | set(indices))
    checkpoints = checkpoint_paths(sources.checkpoints_dir, layers) if sources.checkpoints_dir else {}
    normalisers = read_normalisers(sources.quantiles_dir, layers) if sources.quantiles_dir else {}

    entries_at = {(entry.layer, entry.index): entry for entry in en.values()}
    wanted: dict[tuple[int, int], ReleaseEntry | None] = dict(entries_at)
    for layer, ids in indices.items():
        for index in ids:
            wanted.setdefault((layer, index), None)
    for layer, index in wanted if normalisers else ():
        value = normalisers[layer][index]
        if not math.isfinite(value) or value <= 0:
            raise SafeSailImportError(
                f"{sources.quantiles_dir / f'quantiles_layer{layer}.pt'}: normaliser of feature "
                f"{layer}_{index} is {value}; it must be a positive finite number"
            )

    changes: dict[str, Counter] = {}
    model_id = _upsert_one(
        session,
        Model,
        changes,
        {"name": MODEL_NAME},
        {"n_layers": MODEL_N_LAYERS, "d_model": MODEL_D_MODEL},
        on_insert={"source": MODEL_SOURCE},
    )
    set_id = _upsert_one(
        session,
        SaeSet,
        changes,
        {"model_id": model_id, "name": SET_NAME},
        {"hook_kind": HOOK_KIND, "k": K, "expansion": EXPANSION, "d_sae": D_SAE, "origin": ORIGIN},
    )
    domain_ids = {
        name: _upsert_one(session, Domain, changes, {"name": name}, {})
        for name in sorted({tag for entry in en.values() for tag in entry.tags})
    }

    sae_rows = session.execute(
        select(Sae.id, Sae.sae_set_id, Sae.hook_name, Sae.layer, Sae.checkpoint_path).where(Sae.sae_set_id == set_id)
    ).mappings()
    sae_ids = _sync(
        session,
        Sae,
        changes,
        existing={row["hook_name"]: dict(row) for row in sae_rows},
        wanted={
            _hook_name(layer): {
                "sae_set_id": set_id,
                "layer": layer,
                "hook_name": _hook_name(layer),
                "checkpoint_path": checkpoints.get(layer),
            }
            for layer in layers
        },
        reselect=select(Sae.hook_name, Sae.id).where(Sae.sae_set_id == set_id),
    )

    feature_rows = session.execute(
        select(
            Feature.id,
            Feature.feature_id,
            Feature.sae_id,
            Feature.sae_set_id,
            Feature.layer,
            Feature.index,
            Feature.normaliser,
            Feature.is_safety,
            Feature.candidate_only,
        ).where(Feature.sae_set_id == set_id)
    ).mappings()
    feature_ids = _sync(
        session,
        Feature,
        changes,
        existing={row["feature_id"]: dict(row) for row in feature_rows},
        wanted={
            f"{layer}_{index}": {
                "sae_id": sae_ids[_hook_name(layer)],
                "sae_set_id": set_id,
                "layer": layer,
                "index": index,
                "feature_id": f"{layer}_{index}",
                "normaliser": normalisers[layer][index] if normalisers else None,
                "is_safety": bool(entry and entry.tags),
                "candidate_only": entry is None,
            }
            for (layer, index), entry in sorted(wanted.items())
        },
        reselect=select(Feature.feature_id, Feature.id).where(Feature.sae_set_id == set_id),
    )

    wanted_explanations: dict[tuple[int, str], dict[str, Any]] = {}
    scores_by_key: dict[tuple[int, str], float] = {}
    for language, db in (("en", en), ("zh", zh)):
        for key, entry in db.items():
            if key in en and entry.explanation is not None:
                explanation_key = (feature_ids[key], language)
                wanted_explanations[explanation_key] = {
                    "feature_id": feature_ids[key],
                    "language": language,
                    "text": entry.explanation,
                    "explainer": EXPLAINER,
                    "explainer_model": EXPLAINER_MODEL,
                }
                scores_by_key[explanation_key] = en[key].score
    in_set = select(Feature.id).where(Feature.sae_set_id == set_id)
    release_explanations = select(Explanation.id).where(
        Explanation.explainer == EXPLAINER, Explanation.feature_id.in_(in_set)
    )
    explanation_rows = session.execute(
        select(
            Explanation.id,
            Explanation.feature_id,
            Explanation.language,
            Explanation.text,
            Explanation.explainer,
            Explanation.explainer_model,
        ).where(Explanation.id.in_(release_explanations))
    ).mappings()
    explanation_ids = _sync(
        session,
        Explanation,
        changes,
        existing={(row["feature_id"], row["language"]): dict(row) for row in explanation_rows},
        wanted=wanted_explanations,
        reselect=select(Explanation.feature_id, Explanation.language, Explanation.id).where(
            Explanation.id.in_(release_explanations)
        ),
    )

    score_rows = session.execute(
        select(Score.id, Score.explanation_id, Score.method, Score.value, Score.simulator).where(
            Score.method == SCORE_METHOD, Score.explanation_id.in_(release_explanations)
        )
    ).mappings()
    _sync(
        session,
        Score,
        changes,
        existing={row["explanation_id"]: dict(row) for row in score_rows},
        wanted={
            explanation_ids[key]: {
                "explanation_id": explanation_ids[key],
                "method": SCORE_METHOD,
                "value": value,
                "simulator": SIMULATOR,
            }
            for key, value in scores_by_key.items()
        },
        reselect=None,
    )

    _sync_feature_domains(
        session,
        changes,
        set_id,
        {(feature_ids[key], domain_ids[tag]) for key, entry in en.items() for tag in entry.tags},
    )
    session.flush()

    tag_counts = Counter(tag for entry in en.values() for tag in entry.tags)
    return ImportSummary(
        sae_set_id=set_id,
        layers=layers,
        features=len(entries_at),
        candidate_features=len(wanted) - len(entries_at),
        explanations=dict(Counter(language for _, language in wanted_explanations)),
        scores=len(scores_by_key),
        tagged_features=sum(1 for entry in en.values() if entry.tags),
        domain_counts=dict(tag_counts.most_common()),
        en_without_explanation=sorted(key for key, entry in en.items() if entry.explanation is None),
        zh_only_skipped=sorted(set(zh) - set(en)),
        changes=changes,
    )


def _hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_{HOOK_KIND}"


def _upsert_one(
    session: Session,
    model: type,
    changes: dict[str, Counter],
    key: dict[str, Any],
    values: dict[str, Any],
    on_insert: dict[str, Any] | None = None,
) -> int:
    """The id of the row with `key`, inserted (with `values` and `on_insert`) or updated to `values`."""
    row = session.scalars(select(model).filter_by(**key)).one_or_none()
    counter = changes.setdefault(model.__tablename__, Counter())
    if row is None:
        row = model(**key, **values, **(on_insert or {}))
        session.add(row)
        session.flush()
        counter["inserted"] += 1
    elif any(getattr(row, name) != value for name, value in values.items()):
        for name, value in values.items():
            setattr(row, name, value)
        session.flush()
        counter["updated"] += 1
    return row.id


def _sync(
    session: Session,
    model: type,
    changes: dict[str, Counter],
    existing: dict[Hashable, dict[str, Any]],
    wanted: dict[Hashable, dict[str, Any]],
    reselect,
) -> dict[Hashable, int]:
    """Insert, update and delete rows of `model` so that the `existing` rows (with `id`) become
    `wanted`; rows already equal are not written. Returns the ids by key (via `reselect`, whose
    rows are the key column(s) followed by the id)."""
    counter = changes.setdefault(model.__tablename__, Counter())
    stale = [row["id"] for key, row in existing.items() if key not in wanted]
    updates = [
        {"id": existing[key]["id"], **values}
        for key, values in wanted.items()
        if key in existing and any(existing[key][name] != value for name, value in values.items())
    ]
    inserts = [values for key, values in wanted.items() if key not in existing]
    for start in range(0, len(stale), _CHUNK):
        session.execute(delete(model).where(model.id.in_(stale[start : start + _CHUNK])))
    if updates:
        session.execute(update(model), updates)
    if inserts:
        session.execute(insert(model), inserts)
    counter.update(deleted=len(stale), updated=len(updates), inserted=len(inserts))
    if reselect is None:
        return {}
    return {(row[0] if len(row) == 2 else tuple(row[:-1])): row[-1] for row in session.execute(reselect)}


def _sync_feature_domains(
    session: Session, changes: dict[str, Counter], set_id: int, wanted: set[tuple[int, int]]
) -> None:
    counter = changes.setdefault(FeatureDomain.__tablename__, Counter())
    in_set = select(Feature.id).where(Feature.sae_set_id == set_id)
    rows = session.execute(
        select(FeatureDomain.feature_id, FeatureDomain.domain_id, FeatureDomain.source).where(
            FeatureDomain.feature_id.in_(in_set)
        )
    ).all()
    existing = {(feature, domain): source for feature, domain, source in rows}
    stale = [key for key in existing if key not in wanted]
    relabel = [key for key in wanted if key in existing and existing[key] != TAG_SOURCE]
    inserts = [key for key in wanted if key not in existing]
    for feature, domain in stale:
        session.execute(delete(FeatureDomain).filter_by(feature_id=feature, domain_id=domain))
    if relabel:
        session.execute(
            update(FeatureDomain),
            [{"feature_id": f, "domain_id": d, "source": TAG_SOURCE} for f, d in relabel],
        )
    if inserts:
        session.execute(
            insert(FeatureDomain),
            [{"feature_id": f, "domain_id": d, "source": TAG_SOURCE} for f, d in sorted(inserts)],
        )
    counter.update(deleted=len(stale), updated=len(relabel), inserted=len(inserts))
