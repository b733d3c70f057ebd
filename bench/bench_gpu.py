"""`make bench-gpu`: the paper's scale on one CUDA GPU, with a randomly initialised Qwen2.5-3B-Instruct.

The weights cannot be fetched here and speed does not depend on their values, so the model is built
from Qwen2.5-3B-Instruct's configuration with random weights (bf16) and saved once, with the embedded
SmolLM2 tokenizer (its ids all lie inside Qwen's vocabulary). Three figures, each against a baseline
measured in the same run on the same GPU:

    collect_tokens_per_s ours=<n> bare=<n> ratio=<r>         5 preset layers captured vs the bare forward
    sae_train_tokens_per_s k=200 ours=<n> sparsify=<n> ratio=<r>   d_sae 20480 on layer 17's MLP output
    stream_token_latency ours=<ms> plain=<ms> ratio=<r>      streamed chat with the 5-layer overlay vs generate

`--tiny` runs the same code on a 4-layer Qwen2 configuration on the CPU: a check that the script works,
not a figure to report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config

from bench.bench_collect import measure
from bench.bench_sae import train_ours, train_sparsify
from sae_engine.hooks import capture, run_to_capture
from sae_engine.models import embedded_model_dir, from_config, load_model
from sae_engine.tokens import TokenBatch
from starmap.settings import get_settings

# Qwen/Qwen2.5-3B-Instruct's config.json, minus what only the Hub needs.
QWEN25_3B = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}
TINY = {**QWEN25_3B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def random_model(folder: Path, shape: dict, dtype: torch.dtype) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(get_settings().data_dir))
    config = Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = from_config(config, seed=0).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batches(n: int, rows: int, context: int, vocab: int, device: torch.device) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(0)
    return [
        TokenBatch(torch.randint(0, vocab, (rows, context), generator=generator).to(device),
                   torch.ones(rows, context, dtype=torch.long, device=device))
        for _ in range(n)
    ]


def activations(loaded, hook: str, batches: list[TokenBatch]) -> torch.Tensor:
    chunks = []
    for batch in batches:
        with capture(loaded.model, [hook]) as store:
            run_to_capture(loaded.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        chunks.append(store[hook].reshape(-1, store[hook].shape[-1]).float())
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A 4-layer Qwen2 on the CPU: checks the script only.")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--sae-tokens", type=int, default=2**20)
    parser.add_argument("--sae-batch", type=int, default=4096)
    parser.add_argument("--stream-tokens", type=int, default=128)
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench-gpu needs a CUDA GPU (use --tiny to check the script on the CPU)")
    device = "cpu" if args.tiny else "cuda"
    dtype = "float32" if args.tiny else "bfloat16"
    with tempfile.TemporaryDirectory(prefix="starmap-bench-gpu-") as tmp:
        folder = random_model(Path(tmp) / "qwen2.5-3b-random", TINY if args.tiny else QWEN25_3B, getattr(torch, dtype))
        loaded = load_model(str(folder), device=device, dtype=dtype)
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        layers = loaded.layer_preset()
        print(f"# {name}; random {'tiny Qwen2' if args.tiny else 'Qwen2.5-3B-Instruct'} in {loaded.dtype}, layers {layers}",
              flush=True)

        batches = random_batches(args.batches, args.rows, args.context, loaded.model.config.vocab_size, loaded.device)
        rate = measure(loaded, batches, layers, rounds=3)
        print(f"collect_tokens_per_s ours={rate['ours']:.0f} bare={rate['bare']:.0f} ratio={rate['ours'] / rate['bare']:.2f}",
              flush=True)

        hook = f"blocks.{layers[2]}.hook_mlp_out"
        needed = max(1, -(-args.sae_tokens // (args.rows * args.context)))
        acts = activations(loaded, hook, random_batches(needed, args.rows, args.context, loaded.model.config.vocab_size,
                                                        loaded.device))[: args.sae_tokens]
        ours, ours_fvu = train_ours(acts, 200, args.sae_batch)
        sparsify, sparsify_fvu = train_sparsify(acts, 200, args.sae_batch)
        print(f"sae_train_tokens_per_s k=200 ours={ours:.0f} sparsify={sparsify:.0f} ratio={ours / sparsify:.2f} "
              f"(final fvu ours={ours_fvu:.3f} sparsify={sparsify_fvu:.3f})", flush=True)
        del acts, loaded
        if device == "cuda":
            torch.cuda.empty_cache()

        # The streamed chat runs the real server (its own process: model, SAEs, database, HTTP).
        stream = [sys.executable, "-m", "bench.bench_stream", "--model", str(folder), "--device", device, "--dtype", dtype,
                  "--tokens", str(args.stream_tokens), "--repeats", "3"]
        subprocess.run(stream, check=True, cwd=Path(__file__).resolve().parents[1])


if __name__ == "__main__":
    main()
