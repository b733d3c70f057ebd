"""Streamed chat time per generated token (SAEs on 5 layers + overlay) against plain `model.generate`.

Sets up SmolLM2-135M-Instruct (or `--model`, a local model folder) with randomly initialised TopK SAEs of
the real shape (d_sae = 10 x d_model, k = 200 by default) on the model's five preset layers, a database whose features all have
normalisers (10% explained and tagged, so the overlay has work to do), dense and k-sparse monitors (so each turn's
risk is computed, as in a pipeline's set) and refusal directions, and the app behind uvicorn
on 127.0.0.1. Then, alternating, in one process and on the same model object:

- ours: the chat page's stream, as the browser reads it: `POST /chat/turn` (the form, greedy), then the
  EventSource's `GET /chat/stream/{id}` whose `token` events carry server-rendered chips (HTML); the client
  timestamps every `token` event; per token = (last - first token arrival) / (n - 1): decode steps only,
  rendering, SSE and HTTP included;
- json: the same through `POST /api/chat` (JSON events), for comparison (`--no-json` skips it);
- plain: `model.generate(do_sample=False)` of the same prompt; per token = (T(n) - T(1)) / (n - 1).

Prints medians over the repeats (and, as a comment, the best-of-repeats figures, which other load
on a shared machine cannot inflate):

    stream_token_latency ours=<ms> plain=<ms> ratio=<r>
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from app.loopback_server import serve_on_loopback
from app.main import create_app
from app.state import ServerOptions
from sae_engine.checkpoints import save_saelens
from sae_engine.models import layer_preset, model_source
from sae_engine.topk import TopKSAE
from starmap.db import make_engine, upgrade
from starmap.db.models import (
    Domain,
    Explanation,
    Feature,
    FeatureDomain,
    Model,
    Monitor,
    RefusalDirection,
    Sae,
    SaeSet,
)
from starmap.settings import Settings

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


def build(root: Path, model: str, data_dir: Path, expansion: int, k: int, explained_fraction: float = 0.1,
          seed: int = 0) -> str:
    """A database and random SAEs (d_sae = expansion x d_model, on the model's five preset layers) for `model`."""
    from transformers import AutoConfig

    source, name = model_source(model, data_dir)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    d_model, n_layers = config.hidden_size, config.num_hidden_layers
    d_sae = expansion * d_model
    layers = layer_preset(n_layers)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    url = f"sqlite:///{root / 'bench.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(Domain), [{"id": 1, "name": "violence"}, {"id": 2, "name": "terror"}])
        conn.execute(insert(Model), [{"id": 1, "name": name, "n_layers": n_layers, "d_model": d_model, "source": "bench"}])
        conn.execute(insert(SaeSet), [{"id": 1, "model_id": 1, "name": "random-k", "hook_kind": "mlp_out", "k": k,
                                       "expansion": expansion, "d_sae": d_sae, "origin": "pipeline"}])
        features, explanations, tags = [], [], []
        for slot, layer in enumerate(layers):
            hook = f"blocks.{layer}.hook_mlp_out"
            sae = TopKSAE(d_model, d_sae, k)
            sae.reset_parameters(generator)
            folder = save_saelens(sae, root / "saes" / hook, hook, name)
            conn.execute(insert(Sae), [{"id": slot + 1, "sae_set_id": 1, "layer": layer, "hook_name": hook,
                                        "checkpoint_path": str(folder)}])
            for index in range(d_sae):
                pk = slot * d_sae + index + 1
                features.append({"id": pk, "sae_id": slot + 1, "sae_set_id": 1, "layer": layer, "index": index,
                                 "feature_id": f"{layer}_{index}", "normaliser": float(0.5 + rng.random()),
                                 "is_safety": False})
                if rng.random() < explained_fraction:
                    features[-1]["is_safety"] = True
                    explanations.append({"feature_id": pk, "text": f"bench feature {layer}_{index}", "language": "en",
                                         "explainer": "bench"})
                    tags.append({"feature_id": pk, "domain_id": int(rng.integers(1, 3)), "source": "filter"})
        for table, rows in ((Feature, features), (Explanation, explanations), (FeatureDomain, tags)):
            for start in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[start:start + 20_000])
        conn.execute(insert(Monitor), monitors(layers[len(layers) // 2], d_model, tags, features, rng))
        conn.execute(insert(RefusalDirection), [{"sae_set_id": 1, "layer": layer, "hook_name": f"blocks.{layer}.hook_mlp_out",
                                                 "direction": rng.normal(size=d_model).tolist(), "norm": 1.0,
                                                 "n_refused": 1, "n_answered": 1} for layer in layers])
    engine.dispose()
    return url


def monitors(layer: int, d_model: int, tags: list[dict], features: list[dict], rng: np.random.Generator) -> list[dict]:
    """Random dense and k-sparse monitors per domain and `any`, so that the chat computes its per-turn risk."""
    rows = []
    for domain, domain_id in (("violence", 1), ("terror", 2), ("any", None)):
        tagged = [features[t["feature_id"] - 1] for t in tags if domain_id is None or t["domain_id"] == domain_id][:3]
        common = {"sae_set_id": 1, "domain": domain, "bias": -0.5, "calibration": [1.0, 0.0], "auroc_validation": 0.5,
                  "n_train": 1, "n_validation": 1}
        rows.append({**common, "method": "probe", "layer": layer, "representation": "mean", "features": None,
                     "weights": (0.1 * rng.normal(size=d_model)).tolist()})
        rows.append({**common, "method": "ksparse", "layer": None, "representation": None,
                     "features": [[f["layer"], f["index"]] for f in tagged], "weights": [1.0] * len(tagged)})
    return rows


def stream_once(client: httpx.Client, n: int) -> tuple[float | None, int, float]:
    """Per-token ms from token arrival times, tokens received, and the server's own ms_per_token."""
    arrivals, server = [], float("nan")
    body = {"messages": PROMPT, "max_new_tokens": n, "temperature": 0}
    with client.stream("POST", "/api/chat", json=body) as response:
        response.raise_for_status()
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "token":
                    arrivals.append(time.perf_counter())
            elif line.startswith("data:") and event == "done":
                server = json.loads(line[5:])["ms_per_token"]
    if len(arrivals) < 2:
        return None, len(arrivals), server
    return 1000 * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1), len(arrivals), server


SERVER_MS = re.compile(r"([0-9.]+) ms/token on the server")


def page_stream_once(client: httpx.Client, n: int) -> tuple[float | None, int, float]:
    """As `stream_once`, through the chat page's HTML stream (the form post, then the EventSource's GET)."""
    form = {"message": PROMPT[0]["content"], "max_new_tokens": str(n), "temperature": "0", "seed": "0"}
    posted = client.post("/chat/turn", data=form, headers={"HX-Request": "true"})
    posted.raise_for_status()
    arrivals, server = [], float("nan")
    with client.stream("GET", posted.headers["X-StarMap-Stream"], headers={"Accept": "text/event-stream"}) as response:
        response.raise_for_status()
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "token":
                    arrivals.append(time.perf_counter())
            elif line.startswith("data:") and event == "done" and (found := SERVER_MS.search(line)):
                server = float(found.group(1))
    if len(arrivals) < 2:
        return None, len(arrivals), server
    return 1000 * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1), len(arrivals), server


def plain_once(model, ids: torch.Tensor, n: int) -> float:
    def timed(count: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter() - started

    return 1000 * (timed(n) - timed(1)) / (n - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--expansion", type=int, default=10)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU supports it), bfloat16, float32")
    parser.add_argument("--model", default="smollm2", help="The embedded SmolLM2 (default) or a local model folder.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-json", action="store_true", help="skip the JSON stream of /api/chat (the page's only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="starmap-bench-stream-") as tmp:
        root = Path(tmp)
        data_dir = Settings().data_dir
        url = build(root, args.model, data_dir, args.expansion, args.k)
        settings = Settings(database_url=url, model=args.model, dtype=args.dtype, device=args.device)
        app = create_app(settings, ServerOptions(max_new_tokens=args.tokens))
        with serve_on_loopback(app, timeout_s=600) as base, httpx.Client(base_url=base, timeout=600) as client:
            state = app.state.starmap
            runtime = state.default_set
            assert runtime is not None and runtime.live, runtime.live_error if runtime else "no set"
            loaded = state.model
            ids = torch.tensor([loaded.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                                       return_dict=True)["input_ids"]]).to(loaded.device)
            print(f"# model {loaded.name} {loaded.dtype} on {loaded.device}, torch threads {torch.get_num_threads()}, "
                  f"SAEs on layers {list(runtime.bundle.layers)}, d_sae {runtime.bundle.d_sae}, k {runtime.bundle.k}, "
                  f"overlay encode in {runtime.bundle.compute_dtype}", flush=True)
            warm_up = min(8, args.tokens)
            page_stream_once(client, warm_up)
            if not args.no_json:
                stream_once(client, warm_up)
            plain_once(loaded.model, ids, warm_up)
            ours, as_json, plain, server = [], [], [], []
            for repeat in range(args.repeats):
                per_token, received, server_ms = page_stream_once(client, args.tokens)
                json_ms = None if args.no_json else stream_once(client, args.tokens)[0]
                baseline = plain_once(loaded.model, ids, args.tokens)
                if per_token is None:
                    raise SystemExit(f"the chat stream ended after {received} tokens; use another prompt")
                ours.append(per_token)
                plain.append(baseline)
                server.append(server_ms)
                if json_ms is not None:
                    as_json.append(json_ms)
                json_note = f" json {json_ms:.1f} ms" if json_ms is not None else ""
                print(f"# repeat {repeat}: ours (page, HTML chips) {per_token:.1f} ms ({received} tokens, server "
                      f"{server_ms:.1f} ms){json_note} plain {baseline:.1f} ms ratio {per_token / baseline:.3f}", flush=True)
            ours_ms, plain_ms = statistics.median(ours), statistics.median(plain)
            ratios = [o / p for o, p in zip(ours, plain)]
            print(f"# median of per-repeat ratios {statistics.median(ratios):.3f}; best-of-repeats ratio "
                  f"{min(ours) / min(plain):.3f} (ours {min(ours):.2f}, plain {min(plain):.2f} ms: other load only adds time); "
                  f"server-side ms/token median {statistics.median(server):.1f}")
            if as_json:
                print(f"# JSON stream of /api/chat: median {statistics.median(as_json):.2f} ms/token, "
                      f"ratio {statistics.median(as_json) / plain_ms:.3f}")
            print(f"stream_token_latency ours={ours_ms:.2f} plain={plain_ms:.2f} ratio={ours_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
