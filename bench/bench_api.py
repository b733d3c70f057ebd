"""Server time of the map JSON (20k explained features) and of explanation search (100k features).

Builds a SQLite database with one SAE set of 100,000 features (5 layers x 20,000), every one
explained (generated 12-word explanations), 20,000 of them with map coordinates, starts the app
browse-only (no model) behind uvicorn on 127.0.0.1, and reads the `Server-Timing` header of each
response (time to the response headers, measured inside the app). Prints one line per figure:

    map_json_server_ms features=20000 median=<ms> p95=<ms> bytes=<n>
    search_server_ms features=100000 median=<ms> p95=<ms> queries=<n>
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from app.loopback_server import serve_on_loopback
from app.main import create_app
from app.state import ServerOptions
from starmap.db import make_engine, upgrade
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
from starmap.settings import Settings

WORDS = ["weapon", "weapons", "firearm", "explosive", "explosives", "bomb", "detonator", "violence", "violent", "attack", "assault", "threat", "threatening", "election", "elections", "politician", "political", "party", "vote", "campaign", "government", "protest", "ideology", "extremist", "terror", "terrorism", "terrorist", "militant", "recruitment", "propaganda", "drug", "drugs", "narcotic", "synthesis", "dosage", "overdose", "self", "harm", "suicide", "injury", "cutting", "hate", "slur", "slurs", "insult", "ethnic", "religious", "discrimination", "sexual", "explicit", "intimate", "relationship", "consent", "abuse", "minor", "children", "school", "hospital", "money", "bank", "fraud", "scam", "phishing", "password", "malware", "hacking", "exploit", "lock", "pick", "theft", "robbery", "police", "court", "law", "prison", "sentence", "punctuation", "comma", "period", "quotes", "numbers", "dates", "names", "places", "cities", "countries", "food", "cooking", "recipe", "travel", "weather", "sports", "music", "film", "book", "history", "science", "chemistry", "biology", "physics", "code", "programming", "python", "function", "variable", "loop", "refusal", "apology", "cannot", "sorry", "assist", "request", "harmful", "unsafe", "policy", "guidelines", "warning", "advice", "help", "support", "emotional", "crisis"]
QUERIES = ["weapons", "explosive bomb", "elect", "refusal apology", "self harm", "chemistry synthesis", "zzzz"]


def build_database(url: str, n_layers: int, d_sae: int, n_mapped: int, seed: int = 0) -> None:
    upgrade(url)
    engine = make_engine(url)
    rng = np.random.default_rng(seed)
    domains = ["politics", "pornography", "violence", "terror", "self_harm", "drugs", "hate"]
    with engine.begin() as conn:
        conn.execute(insert(Domain), [{"id": i + 1, "name": d} for i, d in enumerate(domains)])
        conn.execute(insert(Model), [{"id": 1, "name": "bench/model", "n_layers": 30, "d_model": 576, "source": "bench"}])
        conn.execute(insert(SaeSet), [{"id": 1, "model_id": 1, "name": "bench", "hook_kind": "mlp_out", "k": 200,
                                       "expansion": 10, "d_sae": d_sae, "origin": "pipeline"}])
        conn.execute(insert(Sae), [{"id": layer + 1, "sae_set_id": 1, "layer": layer, "hook_name": f"blocks.{layer}.hook_mlp_out",
                                    "checkpoint_path": None} for layer in range(n_layers)])
        mapped = set(rng.choice(n_layers * d_sae, size=n_mapped, replace=False).tolist())
        features, explanations, scores, tags = [], [], [], []
        for pk in range(1, n_layers * d_sae + 1):
            layer, index = divmod(pk - 1, d_sae)
            on_map = (pk - 1) in mapped
            features.append({
                "id": pk, "sae_id": layer + 1, "sae_set_id": 1, "layer": layer, "index": index,
                "feature_id": f"{layer}_{index}", "density": float(rng.random() * 0.01), "normaliser": 1.0 + float(rng.random()),
                "umap_x": float(rng.normal()) if on_map else None, "umap_y": float(rng.normal()) if on_map else None,
                "is_safety": on_map,
            })
            words = rng.choice(WORDS, size=12)
            explanations.append({"id": pk, "feature_id": pk, "text": " ".join(words), "language": "en", "explainer": "bench"})
            scores.append({"explanation_id": pk, "method": "sls", "value": round(float(rng.random()), 3)})
            if on_map:
                tags.append({"feature_id": pk, "domain_id": int(rng.integers(1, len(domains) + 1)), "source": "filter"})
        for table, rows in ((Feature, features), (Explanation, explanations), (Score, scores), (FeatureDomain, tags)):
            for start in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[start:start + 20_000])
    engine.dispose()


def server_ms(response: httpx.Response) -> float:
    match = re.search(r"dur=([\d.]+)", response.headers["server-timing"])
    return float(match.group(1))


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--d-sae", type=int, default=20_000)
    parser.add_argument("--mapped", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="starmap-bench-api-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        started = time.perf_counter()
        build_database(url, args.layers, args.d_sae, args.mapped)
        print(f"# database: {args.layers * args.d_sae} features built in {time.perf_counter() - started:.1f} s", flush=True)
        settings = Settings(data_dir=Path(tmp), database_url=url)
        started = time.perf_counter()
        app = create_app(settings, ServerOptions(load_model=False))
        with serve_on_loopback(app) as base, httpx.Client(base_url=base, timeout=60) as client:
            print(f"# app start-up (catalog + map cache): {time.perf_counter() - started:.1f} s", flush=True)
            timings, size = [], 0
            for _ in range(args.repeats):
                response = client.get("/api/map")
                response.raise_for_status()
                timings.append(server_ms(response))
                size = len(response.content)
            n = response.json()["n"]
            median, p95 = summary(timings)
            print(f"map_json_server_ms features={n} median={median:.2f} p95={p95:.2f} bytes={size}")
            filtered = [server_ms(client.get("/api/map", params={"domain": "violence", "min_score": 0.3}))
                        for _ in range(max(3, args.repeats // 3))]
            median, p95 = summary(filtered)
            print(f"map_json_filtered_server_ms median={median:.2f} p95={p95:.2f}")
            timings = []
            for _ in range(max(1, args.repeats // len(QUERIES))):
                for query in QUERIES:
                    response = client.get("/api/features", params={"q": query, "limit": 50})
                    response.raise_for_status()
                    timings.append(server_ms(response))
            median, p95 = summary(timings)
            print(f"search_server_ms features={args.layers * args.d_sae} median={median:.2f} p95={p95:.2f} queries={len(timings)}")
            filtered = [server_ms(client.get("/api/features", params={"q": q, "domain": "violence", "layer": 2, "limit": 20}))
                        for q in QUERIES]
            median, p95 = summary(filtered)
            print(f"search_filtered_server_ms median={median:.2f} p95={p95:.2f}")


if __name__ == "__main__":
    main()
