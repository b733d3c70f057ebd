"""Activation collection throughput: StarMap's capture of the 5 preset layers against the bare forward.

"Bare" is the base model (no LM head) with its layer list cut after the deepest hooked layer,
run without any hook: the least work any collector must do. Ours runs the full model under
`capture`, which stops the pass right after the deepest hook point. Same batches, same dtype,
alternating rounds so that machine load affects both alike.

    make bench-collect        # or: .venv/bin/python bench/bench_collect.py --batches 12
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bench.bench_sae import bench_texts
from sae_engine.hooks import capture, decoder_layers, run_to_capture
from sae_engine.models import load_model
from sae_engine.tokens import pack_texts
from starmap.settings import get_settings


def measure(loaded, batches: list, layers: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Tokens per second of ours (capture of `layers`, stopping after the deepest) and of the bare truncated forward."""
    points = [f"blocks.{layer}.hook_mlp_out" for layer in layers]
    n_tokens = sum(b.n_tokens for b in batches)
    model = loaded.model
    all_layers = decoder_layers(model)

    def ours() -> None:
        for batch in batches:
            with capture(model, points) as store:
                run_to_capture(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            [store[p].float() for p in points]

    def bare() -> None:
        model.model.layers = nn.ModuleList(all_layers[: max(layers) + 1])
        try:
            with torch.inference_mode():
                for batch in batches:
                    model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            model.model.layers = all_layers

    ours(), bare()  # warm-up
    times = {"ours": 0.0, "bare": 0.0}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("bare", bare)):
            synchronize(loaded.device)
            start = time.perf_counter()
            fn()
            synchronize(loaded.device)
            times[name] += time.perf_counter() - start
    return {name: n_tokens * rounds / t for name, t in times.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = get_settings()
    loaded = load_model("smollm2", settings.data_dir)
    layers = loaded.layer_preset()
    batches = []
    for batch in pack_texts(bench_texts(settings.data_dir), loaded.tokenizer, args.context, args.rows):
        batches.append(batch)
        if len(batches) == args.batches:
            break
    rate = measure(loaded, batches, layers, args.rounds)
    print(f"# SmolLM2 {loaded.dtype}, layers {layers}, {len(batches)} batches of {args.rows}x{args.context}, "
          f"threads={torch.get_num_threads()}")
    print(f"collect_tokens_per_s ours={rate['ours']:.0f} bare={rate['bare']:.0f} ratio={rate['ours'] / rate['bare']:.2f}")


if __name__ == "__main__":
    main()
