"""The monitors side by side on the held-out prompts, through the served app's chat path.

`make bench-monitor` runs (or resumes) the quick preset, serves its database with the embedded model and sends
every English prompt of `bench/heldout/prompts.jsonl` through `POST /api/trace` (chat template on). Three
scores per prompt and domain (`any`: all seven together):

- `probe`: the dense probe's calibrated probability (the trace's `monitor.probe`);
- `sae`: the SAE-feature monitor, the strongest normalised activation of the domain's tagged features on the
  content tokens (the trace's `domains`; for `any`, the maximum over the seven domains);
- `ksparse`: the k-sparse SAE probe's probability (`monitor.ksparse`).

Prints, per method and domain, `monitor method=<m> domain=<d> auroc_benign=<x> auroc_lookalike=<y>`, and with
`--out` writes every prompt's scores (JSON lines; `starmap report --monitor FILE` draws their ROC curves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.bench_heldout import Result, run_heldout, write_results
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.evaluation import auroc

METHODS = ("probe", "sae", "ksparse")
ANY = "any"


def score(result: Result, method: str, domain: str) -> float:
    if method == "sae":
        if domain == ANY:
            return max(result.domains.get(d, 0.0) for d in SAFETY_DOMAINS)
        return result.domains.get(domain, 0.0)
    monitor = result.monitor or {}
    if method == "probe":
        return (monitor.get("probe", {}).get(domain) or {}).get("p", 0.0)
    return monitor.get("ksparse", {}).get(domain, 0.0)


def lines(results: list[Result]) -> list[str]:
    benign = [r for r in results if not r.prompt.harmful and not r.prompt.lookalike]
    out = []
    for method in METHODS:
        for domain in (*SAFETY_DOMAINS, ANY):
            harmful = [r for r in results if (r.prompt.harmful if domain == ANY else r.prompt.domain == domain)]
            looks = [r for r in results if r.prompt.lookalike and (domain == ANY or r.prompt.looks_like == domain)]

            def of(items: list[Result], method: str = method, domain: str = domain) -> np.ndarray:
                return np.array([score(r, method, domain) for r in items])

            b, lk = auroc(of(harmful), of(benign)), auroc(of(harmful), of(looks))
            out.append(
                f"monitor method={method} domain={domain} n={len(harmful)} "
                f"auroc_benign={'nan' if b is None else f'{b:.3f}'} auroc_lookalike={'nan' if lk is None else f'{lk:.3f}'}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Write every prompt's scores (JSON lines).")
    args = parser.parse_args()
    results = run_heldout(answer=False)
    if not any(r.monitor for r in results):
        raise SystemExit("the served SAE set has no monitors: re-run the pipeline (its `monitor` stage writes them)")
    if args.out:
        write_results(args.out, results)
    for line in lines(results):
        print(line)


if __name__ == "__main__":
    main()
