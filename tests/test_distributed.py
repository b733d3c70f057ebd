"""Data-parallel training: 2 gloo ranks on the two halves of each batch (or one rank on all of it and the other
on none) take the same steps as 1 process."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_engine.training import SAETrainConfig, SAETrainer

CONFIG = SAETrainConfig(k=2, expansion_factor=16, batch_size=128, dead_after_tokens=128, compute_dtype="float32")
STEPS, D_IN = 12, 16


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(128, D_IN, generator=generator) * 3 + 1 for _ in range(STEPS)]


def _rank_main(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trainer = SAETrainer(D_IN, "ddp", CONFIG)
    for step, batch in enumerate(_batches()):
        # The last step: rank 0 holds the whole batch, rank 1 none (the end of a stream drained unevenly).
        shard = batch.chunk(world)[rank] if step < STEPS - 1 else (batch if rank == 0 else batch[:0])
        trainer.step(shard)
    if rank == 0:
        torch.save({**trainer.sae.state_dict(), "fired": trainer.fired_count, "tokens": trainer.tokens_trained}, out_file)
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    single = SAETrainer(D_IN, "ddp", CONFIG)
    for batch in _batches():
        single.step(batch)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    parallel = torch.load(out)
    assert parallel["tokens"] == single.tokens_trained == STEPS * 128
    assert torch.equal(parallel["fired"], single.fired_count)
    for name, tensor in single.sae.state_dict().items():
        assert torch.allclose(parallel[name], tensor, atol=1e-4, rtol=1e-3), name
    assert single.last.auxk > 0, "the dead-latent path (AuxK) was exercised"
