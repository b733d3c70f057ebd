"""The LLM explainer: examples from every activation level with the activating tokens marked, a few
hard negatives, the feature's output tokens; one short sentence back, at temperature 0."""

from __future__ import annotations

import re

from offline_pipeline.explain.llm_client import LLMClient
from offline_pipeline.explain.prompts import ExplainerPromptConfig, explainer_messages
from offline_pipeline.explain.records import Explanation, FeatureExamples

EXPLAINER = "llm"
_LABEL = re.compile(r"^\s*(explanation|answer|sentence)\s*:\s*", re.IGNORECASE)


class EmptyExplanation(RuntimeError):
    """The model answered nothing usable."""


def clean_sentence(answer: str) -> str:
    """The first non-empty line of an answer, without a leading label or wrapping quotes."""
    for line in answer.splitlines():
        line = _LABEL.sub("", line).strip().strip("`").strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
            line = line[1:-1].strip()
        if line:
            return line
    return ""


class LLMExplainer:
    def __init__(self, client: LLMClient, config: ExplainerPromptConfig = ExplainerPromptConfig(), max_tokens: int = 64):
        self.client = client
        self.config = config
        self.max_tokens = max_tokens

    def messages(self, examples: FeatureExamples) -> list[dict[str, str]]:
        return explainer_messages(examples, self.config)

    async def explain(self, examples: FeatureExamples) -> Explanation:
        result = await self.client.chat(self.messages(examples), temperature=0.0, max_tokens=self.max_tokens)
        text = clean_sentence(result.text)
        if not text:
            raise EmptyExplanation(f"feature {examples.feature_id}: the model returned no explanation ({result.text!r})")
        return Explanation(
            feature_id=examples.feature_id,
            text=text,
            explainer=EXPLAINER,
            explainer_model=self.client.model,
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
        )
