"""Explanation and simulation scoring of SAE features (spec section 6).

- `records`: the plain dataclasses everything takes and gives (examples, explanations, scores);
- `llm_client`, `response_cache`: any OpenAI-compatible endpoint, with retries, cost ledger, disk cache;
- `prompts`, `llm_explainer`, `statistical_explainer`: the LLM and the offline explainers;
- `segments`, `simulation`, `scoring`: SLS and TLS simulation scores;
- `runner`, `store`, `cli`: many features at once, the database / JSONL, `starmap explain|score`.
"""
