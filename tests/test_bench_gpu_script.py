"""`bench/bench_gpu.py` cannot run its real figures here (no GPU); its `--tiny` mode runs the same code on the CPU."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_end_to_end_on_a_tiny_qwen2(data_dir: Path) -> None:
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--tiny", "--rows", "2", "--context", "32", "--batches", "2",
           "--sae-tokens", "2048", "--sae-batch", "512", "--stream-tokens", "6"]
    env = {"PATH": "/usr/bin:/bin", "STARMAP_DATA_DIR": str(data_dir), "HOME": str(Path.home())}
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for figure in ("collect_tokens_per_s", "sae_train_tokens_per_s k=200", "stream_token_latency"):
        assert re.search(rf"^{figure} ours=[\d.]+ \w+=[\d.]+ ratio=[\d.]+", done.stdout, re.M), done.stdout
