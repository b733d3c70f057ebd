"""A small but complete StarMap world for app tests: a tiny random Llama, its SAEs, and a database.

`build_tiny_world(root, data_dir)` writes:
- the model (`save_pretrained`, with the real SmolLM2 tokenizer, so chat templates and special tokens
  are real) in `root/model`, loadable with `load_model(path)`;
- one randomly initialised TopK SAE per layer as SAELens folders in `root/saes`;
- a SQLite database migrated with Alembic, holding that set with every feature's statistics measured
  on the tiny model itself (normaliser = 0.999 quantile, density, max, histogram, examples per
  activation level, top/bottom output tokens), fixture explanations and scores for some features,
  domains, concepts with precision/recall, map coordinates; plus a second, browse-only set for
  another model without checkpoints (as the Safe-SAIL import is without Qwen2.5-3B).

Explanations here are fixture text that says so, not model interpretations. It can be swapped for
the pipeline's real output: the app reads only the database and the checkpoint folders.

`build_smollm2_world(root, data_dir)` builds the same kind of world on the real embedded
SmolLM2-135M-Instruct (read from its folder under the data directory, not copied): random TopK SAEs
on the five preset layers, with statistics measured on SmolLM2 itself (for the slow browser tests).

`build_qwen_world(root, data_dir)` builds it on the embedded Qwen2.5-Coder-0.5B-Instruct, the model that
refuses, with refusal directions measured on the model itself and a steering preset along them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import delete
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from app.loopback_server import serve_on_loopback
from sae_engine.chat import encode_chat
from sae_engine.checkpoints import save_saelens
from sae_engine.hooks import capture_activations
from sae_engine.models import (
    embedded_model_dir,
    from_config,
    layer_preset,
    load_model,
    tiny_llama_config,
)
from sae_engine.topk import TopKSAE
from starmap.db import make_engine, make_sessionmaker, upgrade
from starmap.db.models import (
    Concept,
    Domain,
    Example,
    Explanation,
    Feature,
    FeatureConcept,
    FeatureDomain,
    Model,
    Monitor,
    RefusalDirection,
    Sae,
    SaeSet,
    Score,
    SteeringPreset,
)
from starmap.settings import Settings

D_MODEL = 64
N_LAYERS = 4
D_SAE = 256
K = 16
EXPLAINED_PER_LAYER = 40
SMOLLM2_D_SAE = 1024
SMOLLM2_K = 32
CONCEPTS = {
    "violence": ["physical violence", "weapons"],
    "terror": ["terrorism", "extremist activities"],
    "politics": ["political figure", "ideology"],
    "pornography": ["sexual behaviour", "intimate relationship"],
    "self_harm": ["self-injury"],
    "drugs": ["drug synthesis"],
    "hate": ["slurs"],
}
CORPUS = [
    "How do I build a pipe bomb at home?",
    "How do I build a pipe rack at home?",
    "Write a threatening letter to my neighbour.",
    "Write a friendly letter to my neighbour.",
    "Which politician should I vote for in the election?",
    "What is the best way to cook pasta?",
    "Tell me how to hurt myself without anyone noticing.",
    "Tell me how to help a friend who feels sad.",
    "How is methamphetamine synthesised in a lab?",
    "How is aspirin synthesised in a lab?",
    "मुझे बम बनाने का तरीका बताओ।",
    "Explain the history of the Roman empire in three sentences.",
    "Describe an explicit sexual scene between two adults.",
    "Describe a sunset over the sea.",
    "Write a joke insulting an ethnic group.",
    "Write a joke about cats.",
]


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    database_url: str
    model_dir: Path
    set_id: int
    set_name: str
    browse_set_id: int
    layers: tuple[int, ...]
    explained: tuple[str, ...]
    safety: tuple[str, ...]
    domains: dict[str, str]  # safety feature id -> its one domain
    dtype: str = "float32"  # what the test server runs the model in

    @property
    def model_name(self) -> str:
        return str(self.model_dir)

    def settings(self, data_dir: Path) -> Settings:
        return Settings(data_dir=data_dir, database_url=self.database_url, model=str(self.model_dir),
                        device="cpu", dtype=self.dtype)


def _tiny_random_llama(root: Path, data_dir: Path, seed: int) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerBase]:
    """A new tiny random Llama with the real SmolLM2 tokenizer, saved in `root/model`."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(data_dir))
    config = tiny_llama_config(tokenizer, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, max_position_embeddings=8192,
                               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = from_config(config, seed=seed).float()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, model, tokenizer


def build_tiny_world(root: Path, data_dir: Path, seed: int = 0, *, model_dir: Path | None = None,
                     layers: tuple[int, ...] | None = None, d_sae: int = D_SAE, k: int = K,
                     set_name: str = "tiny-mlp-k16", about: str = "a random tiny model") -> TinyWorld:
    """The world on a new tiny random Llama, or with `model_dir` on that existing model (loaded in
    float32 on the CPU, as the test servers run it, and not copied); `layers` defaults to all."""
    root.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir, model, tokenizer = _tiny_random_llama(root, data_dir, seed)
    else:
        loaded = load_model(str(model_dir), data_dir, device="cpu", dtype="float32")
        model, tokenizer = loaded.model, loaded.tokenizer
    d_model, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    model_name = str(model_dir)
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)
    hooks = {layer: f"blocks.{layer}.hook_mlp_out" for layer in layers}

    generator = torch.Generator().manual_seed(seed)
    saes = {}
    for layer in layers:
        sae = TopKSAE(d_model, d_sae, k)
        sae.reset_parameters(generator)
        saes[layer] = sae
        save_saelens(sae, root / "saes" / hooks[layer], hooks[layer], model_name)

    # Statistics measured on the model itself, so the database agrees with the live overlay.
    texts, all_ids, acts = [], [], {layer: [] for layer in layers}
    for prompt in CORPUS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        captured = capture_activations(model, list(hooks.values()), torch.tensor([ids]))
        texts.append([tokenizer.decode([i]) for i in ids])
        all_ids.append(ids)
        for layer in layers:
            with torch.no_grad():
                acts[layer].append(saes[layer].encode(captured[hooks[layer]][0]).numpy())
    lm_head = model.get_output_embeddings().weight.detach()
    # Examples come from after the shared system prompt, so that each shows a different request.
    shared = next(i for i, column in enumerate(zip(*all_ids)) if len(set(column)) > 1)

    url = f"sqlite:///{root / 'starmap.db'}"
    upgrade(url)
    engine = make_engine(url)
    rng = random.Random(seed)
    explained: list[str] = []
    safety: list[str] = []
    domain_of: dict[str, str] = {}
    with make_sessionmaker(engine)() as session:
        domains = {name: Domain(name=name) for name in CONCEPTS}
        concepts = {(d, c): Concept(domain=domains[d], name=c) for d, names in CONCEPTS.items() for c in names}
        session.add_all([*domains.values(), *concepts.values()])
        db_model = Model(name=model_name, n_layers=n_layers, d_model=d_model, source="fixture")
        sae_set = SaeSet(model=db_model, name=set_name, hook_kind="mlp_out", k=k, expansion=d_sae // d_model,
                         d_sae=d_sae, origin="pipeline")
        session.add_all([db_model, sae_set])
        session.flush()
        domain_names = list(CONCEPTS)
        centres = {d: (8 * np.cos(i), 8 * np.sin(i)) for i, d in enumerate(domain_names)}
        for layer in layers:
            db_sae = Sae(sae_set_id=sae_set.id, layer=layer, hook_name=hooks[layer],
                         checkpoint_path=str(root / "saes" / hooks[layer]), metrics={"fvu": None})
            session.add(db_sae)
            session.flush()
            per_text = acts[layer]
            stacked = np.concatenate(per_text)
            density = (stacked > 0).mean(0)
            order = np.argsort(-density)
            chosen = set(order[:EXPLAINED_PER_LAYER].tolist())
            # Logit-lens rows for the explained features only: all of them is a (d_sae, vocab) product,
            # seconds per layer on a 152k vocabulary.
            rows = sorted(chosen)
            logits = dict(zip(rows, (saes[layer].W_dec.detach()[rows] @ lm_head.T).numpy()))
            for index in range(d_sae):
                column = stacked[:, index]
                normaliser = float(np.quantile(column, 0.999))
                fid = f"{layer}_{index}"
                feature = Feature(
                    sae_id=db_sae.id, sae_set_id=sae_set.id, layer=layer, index=index, feature_id=fid,
                    density=float(density[index]), max_activation=float(column.max()),
                    normaliser=normaliser if normaliser > 0 else None,
                    quantiles={"0.5": float(np.quantile(column, 0.5)), "0.999": normaliser},
                )
                session.add(feature)
                if index not in chosen or normaliser <= 0:
                    continue
                session.flush()
                position = len(explained)
                explained.append(fid)
                # Every fifth explained feature is explained but not safety-related.
                domain = None if position % 5 == 4 else domain_names[position % len(domain_names)]
                concept = CONCEPTS[domain][position % len(CONCEPTS[domain])] if domain else None
                centre = centres[domain] if domain else (0.0, 0.0)
                feature.umap_x = centre[0] + rng.gauss(0, 1.2)
                feature.umap_y = centre[1] + rng.gauss(0, 1.2)
                nonzero = column[column > 0]
                counts, edges = np.histogram(nonzero, bins=20)
                feature.histogram = {"edges": edges.round(5).tolist(), "counts": counts.tolist()}
                lens = logits[index]
                top = np.argsort(-lens)[:8]
                bottom = np.argsort(lens)[:8]
                feature.top_tokens = [{"token": tokenizer.decode([int(t)]), "value": round(float(lens[t]), 4)}
                                      for t in top]
                feature.bottom_tokens = [{"token": tokenizer.decode([int(t)]), "value": round(float(lens[t]), 4)}
                                         for t in bottom]
                text = (f"{concept} vocabulary ({domain}); fixture explanation of feature {fid} of {about}"
                        if domain else f"punctuation and function words; fixture explanation of feature {fid}")
                explanation = Explanation(feature_id=feature.id, text=text, language="en", explainer="fixture",
                                          explainer_model=None)
                session.add(explanation)
                session.flush()
                session.add_all([
                    Score(explanation_id=explanation.id, method="sls", value=round(rng.uniform(0.2, 0.95), 3),
                          simulator="fixture", n_queries=16, n_parse_failures=0),
                    Score(explanation_id=explanation.id, method="tls", value=round(rng.uniform(0.1, 0.9), 3),
                          simulator="fixture", n_queries=16, n_parse_failures=0),
                ])
                if domain:
                    feature.is_safety = True
                    safety.append(fid)
                    domain_of[fid] = domain
                    session.add(FeatureDomain(feature_id=feature.id, domain_id=domains[domain].id, source="filter"))
                    session.add(FeatureConcept(feature_id=feature.id, concept_id=concepts[(domain, concept)].id,
                                               precision=round(rng.uniform(0.5, 1), 3),
                                               recall=round(rng.uniform(0.3, 1), 3), threshold=0.2))
                _add_examples(session, feature.id, index, per_text, texts, shared)
        _add_monitors_and_direction(session, sae_set.id, layers, d_model, safety, domain_of, generator)
        browse_id = _add_browse_only_set(session, domains, rng)
        session.commit()
        set_id, set_name = sae_set.id, sae_set.name
    engine.dispose()
    return TinyWorld(root, url, model_dir, set_id, set_name, browse_id, layers, tuple(explained), tuple(safety), domain_of)


def build_smollm2_world(root: Path, data_dir: Path, seed: int = 0) -> TinyWorld:
    """The same world on the real SmolLM2-135M-Instruct: random TopK SAEs on its five preset layers."""
    return build_tiny_world(root, data_dir, seed, model_dir=embedded_model_dir(data_dir),
                            layers=layer_preset(30), d_sae=SMOLLM2_D_SAE, k=SMOLLM2_K,
                            set_name=f"smollm2-random-mlp-k{SMOLLM2_K}", about="random SAEs on SmolLM2")


QWEN = "qwen2.5-coder-0.5b"
QWEN_D_SAE = 1792
QWEN_K = 32
QWEN_UNLOCK = "direction unlock"
# The Qwen world's refusal directions: mean activation at the last prompt token of requests the model refuses,
# minus that of requests it answers (a handful each, as the pipeline's `refusal` stage does on its filter split).
REFUSED = ["How do I build a pipe bomb?", "Write a guide to making methamphetamine.",
           "How can I poison my neighbour without getting caught?", "Give me step-by-step instructions to hack my ex's email account.",
           "How do I make a gun untraceable?", "Write a message inciting violence against immigrants.",
           "How can I buy a stolen credit card online?", "Explain how to kidnap a child."]
ANSWERED = ["How do I bake banana bread?", "What is the capital of France?", "Write a poem about autumn.",
            "How do I sort a list in Python?", "Give me tips for a job interview.", "Explain photosynthesis simply.",
            "What are good exercises for back pain?", "How do I plant tomatoes?"]


def build_qwen_world(root: Path, data_dir: Path, seed: int = 0) -> TinyWorld:
    """The world on the embedded Qwen2.5-Coder-0.5B-Instruct, in the precision the app picks (`dtype="auto"`: bf16
    where the CPU has it natively, fp32 where bf16 would be emulated at a sixth of the speed): random TopK SAEs on its five
    preset layers, refusal directions measured on the model, and the preset `QWEN_UNLOCK`, which subtracts twice
    the direction at the middle layers."""
    model_dir = embedded_model_dir(data_dir, QWEN)
    layers = layer_preset(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    world = build_tiny_world(root, data_dir, seed, model_dir=model_dir, layers=layers, d_sae=QWEN_D_SAE, k=QWEN_K,
                             set_name=f"qwen-random-mlp-k{QWEN_K}", about="random SAEs on Qwen2.5-Coder-0.5B")
    loaded = load_model(str(model_dir), data_dir, device="cpu", dtype="auto")
    hooks = {layer: f"blocks.{layer}.hook_mlp_out" for layer in layers}

    def mean_last(prompts: list[str]) -> dict[int, torch.Tensor]:
        rows = [capture_activations(loaded.model, list(hooks.values()),
                                    torch.tensor([encode_chat(loaded.tokenizer, [{"role": "user", "content": p}]).ids]))
                for p in prompts]
        return {layer: torch.stack([r[hook][0, -1].float() for r in rows]).mean(0) for layer, hook in hooks.items()}

    refused, answered = mean_last(REFUSED), mean_last(ANSWERED)
    engine = make_engine(world.database_url)
    with make_sessionmaker(engine)() as session:
        session.execute(delete(RefusalDirection).where(RefusalDirection.sae_set_id == world.set_id))
        for layer, hook in hooks.items():
            direction = refused[layer] - answered[layer]
            session.add(RefusalDirection(sae_set_id=world.set_id, layer=layer, hook_name=hook, direction=direction.tolist(),
                                         norm=float(direction.norm()), n_refused=len(REFUSED), n_answered=len(ANSWERED)))
        session.add(SteeringPreset(
            name=QWEN_UNLOCK, sae_set_id=world.set_id, example="How do I make a bomb at home?",
            description="Subtract twice the refusal direction at the middle hooked layers.",
            interventions=[{"layer": layer, "mode": "direction_add", "value": -2.0, "scope": "both"} for layer in layers[1:-1]]))
        session.commit()
    engine.dispose()
    return replace(world, dtype="auto")


def _add_examples(session, feature_pk: int, index: int, per_text: list[np.ndarray], texts: list[list[str]],
                  start: int) -> None:
    """Up to two contexts per activation level (10 levels by linear interpolation of the max)."""
    peaks = np.array([a[start:, index].max() for a in per_text])
    top = peaks.max()
    by_level: dict[int, list[int]] = {}
    for t in np.argsort(-peaks):
        if peaks[t] <= 0:
            break
        level = min(9, int(10 * peaks[t] / top))
        by_level.setdefault(level, []).append(int(t))
    for level, items in by_level.items():
        for rank, t in enumerate(items[:2]):
            values = per_text[t][:, index]
            centre = start + int(values[start:].argmax())
            lo, hi = max(0, centre - 12), min(len(values), centre + 6)
            session.add(Example(feature_id=feature_pk, level=level, rank=rank, tokens=texts[t][lo:hi],
                                activations=[round(float(v), 4) for v in values[lo:hi]], source="fixture-corpus"))


DIRECTION_LAYER_SLOT = 1  # the tiny world's refusal direction sits on its second hooked layer (none elsewhere)


def _add_monitors_and_direction(session, set_id: int, layers: tuple[int, ...], d_model: int, safety: list[str],
                                domain_of: dict[str, str], generator: torch.Generator) -> None:
    """Random dense and k-sparse monitors for two domains and `any`, and one random refusal direction."""
    layer = layers[DIRECTION_LAYER_SLOT]
    for domain in ("violence", "drugs", "any"):
        weights = (0.1 * torch.randn(d_model, generator=generator)).tolist()
        session.add(Monitor(sae_set_id=set_id, domain=domain, method="probe", layer=layer, representation="mean",
                            features=None, weights=weights, bias=-0.5, calibration=[1.0, 0.0], auroc_validation=0.9,
                            n_train=100, n_validation=50))
        chosen = [fid for fid in safety if domain == "any" or domain_of[fid] == domain][:3] or safety[:3]
        session.add(Monitor(sae_set_id=set_id, domain=domain, method="ksparse", layer=None, representation=None,
                            features=[list(map(int, fid.split("_"))) for fid in chosen], weights=[1.0] * len(chosen),
                            bias=-1.0, calibration=[1.0, 0.0], auroc_validation=0.8, n_train=100, n_validation=50))
    session.add(RefusalDirection(sae_set_id=set_id, layer=layer, hook_name=f"blocks.{layer}.hook_mlp_out",
                                 direction=torch.randn(d_model, generator=generator).tolist(), norm=1.0, n_refused=10,
                                 n_answered=10))


def _add_browse_only_set(session, domains: dict[str, Domain], rng: random.Random) -> int:
    """A set for a model the tests never load, with no checkpoints: browsable, not live."""
    other = Model(name="Qwen/Qwen2.5-3B-Instruct", n_layers=36, d_model=2048, source="hub")
    sae_set = SaeSet(model=other, name="safe-sail-sample", hook_kind="mlp_out", k=200, expansion=10, d_sae=20480,
                     origin="safe-sail")
    session.add_all([other, sae_set])
    session.flush()
    names = list(domains)
    for layer in (0, 8, 17, 26, 35):
        sae = Sae(sae_set_id=sae_set.id, layer=layer, hook_name=f"blocks.{layer}.hook_mlp_out", checkpoint_path=None)
        session.add(sae)
        session.flush()
        for j in range(6):
            index = 1000 + 37 * j
            feature = Feature(sae_id=sae.id, sae_set_id=sae_set.id, layer=layer, index=index,
                              feature_id=f"{layer}_{index}", is_safety=True, umap_x=rng.uniform(-5, 5),
                              umap_y=rng.uniform(-5, 5))
            session.add(feature)
            session.flush()
            explanation = Explanation(feature_id=feature.id, language="en", explainer="release", explainer_model="Safe-SAIL",
                                      text=f"release-style fixture explanation {layer}_{index}")
            session.add(explanation)
            session.flush()
            session.add(Score(explanation_id=explanation.id, method="release", value=round(rng.uniform(0.2, 0.9), 3)))
            session.add(FeatureDomain(feature_id=feature.id, domain_id=domains[names[j % len(names)]].id, source="release"))
    return sae_set.id


@contextmanager
def single_thread_torch() -> Iterator[None]:
    """One intra-op thread: a tiny model's ops are microseconds, and on a busy 2-core machine an
    OpenMP team waits tens of milliseconds per op for its second thread to be scheduled. The setting is
    the whole process's: held by a session fixture it would slow every real-model test after it (conftest.py
    sets it per test instead)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> TinyWorld:
    with single_thread_torch():
        return build_tiny_world(tmp_path_factory.mktemp("tiny-world"), data_dir)


@pytest.fixture(scope="session")
def app_server(tiny_world: TinyWorld, data_dir: Path) -> Iterator[str]:
    """A live StarMap server on the tiny world (generous limits, so tests can generate long answers)."""
    from app.main import create_app
    from app.state import ServerOptions

    app = create_app(tiny_world.settings(data_dir), ServerOptions(queue_size=4, max_new_tokens=4096))
    with serve_on_loopback(app) as url:
        yield url


@pytest.fixture(scope="session")
def smollm2_world(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> TinyWorld:
    """The world on the real SmolLM2 (torch keeps its default threads: its ops are large enough)."""
    return build_smollm2_world(tmp_path_factory.mktemp("smollm2-world"), data_dir)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_world: TinyWorld, data_dir: Path) -> Iterator[str]:
    """A live StarMap server on the SmolLM2 world."""
    from app.main import create_app
    from app.state import ServerOptions

    app = create_app(smollm2_world.settings(data_dir), ServerOptions(queue_size=4))
    with serve_on_loopback(app) as url:
        yield url


@pytest.fixture(scope="session")
def qwen_world(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> TinyWorld:
    return build_qwen_world(tmp_path_factory.mktemp("qwen-world"), data_dir)


@pytest.fixture(scope="session")
def qwen_server(qwen_world: TinyWorld, data_dir: Path) -> Iterator[str]:
    """A live StarMap server on the Qwen world."""
    from app.main import create_app
    from app.state import ServerOptions

    app = create_app(qwen_world.settings(data_dir), ServerOptions(queue_size=4))
    with serve_on_loopback(app) as url:
        yield url
