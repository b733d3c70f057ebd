"""How a chat becomes tokens, and which of those tokens are the conversation's own words.

The app and the pipeline both encode through `encode_chat`, so a feature is measured offline exactly as it
is shown live: the model's chat template with its default system prompt (unless the chat brings its own),
the turns, and, where there is one, the assistant's answer after the generation prompt.

A token is *content* when it carries the words of a user or assistant turn. Template tokens (`<|im_start|>`,
role names, separators, the generation prompt) and every token of a system turn are not: they are the same
in every chat, so a feature that fires on them says nothing about the conversation. Content is found from
character offsets: each turn's text is located in the rendered template by rendering the chat once more with
unique placeholders in place of the texts, which also proves the template inserts the texts verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sae_engine.tokens import special_ids

CONTENT_ROLES = ("user", "assistant")
_PLACEHOLDER = "\u2063{}\u2063"  # invisible separators: no chat template or text contains them


class ChatEncodingError(ValueError):
    """The tokenizer's chat template does not carry a turn's text verbatim, so content cannot be located."""


@dataclass(frozen=True)
class EncodedChat:
    ids: list[int]
    content: list[bool]  # per token: part of a user or assistant turn's own words
    prompt_length: int  # tokens before the answer (the answer's first token is generated at this position)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.content):
            raise ValueError("ids and content differ in length")

    @property
    def last_prompt_token(self) -> int:
        return self.prompt_length - 1


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text (ending where the assistant's answer begins) and the character span of every content turn."""
    messages = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    marked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    spans: list[tuple[int, int]] = []
    rebuilt, cursor = "", 0
    for i, m in enumerate(messages):
        mark = _PLACEHOLDER.format(i)
        at = template.find(mark, cursor)
        if at < 0:
            raise ChatEncodingError(f"the chat template does not show the text of turn {i} ({m['role']}) verbatim")
        rebuilt += template[cursor:at]
        if m["role"] in CONTENT_ROLES:
            spans.append((len(rebuilt), len(rebuilt) + len(m["content"])))
        rebuilt += m["content"]
        cursor = at + len(mark)
    rebuilt += template[cursor:]
    if rebuilt != text:
        raise ChatEncodingError("the chat template changes the turns' texts (it does not insert them verbatim)")
    return text, spans


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], special: set[int]) -> tuple[list[int], list[bool]]:
    if not text:
        return [], []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    content = [
        i not in special and end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        for i, (start, end) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, content


def _untemplated(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The turns' texts joined by blank lines, for models without a chat template (and `chat_template=False`)."""
    text, spans = "", []
    for m in messages:
        if text:
            text += "\n\n"
        if m["role"] in CONTENT_ROLES:
            spans.append((len(text), len(text) + len(m["content"])))
        text += m["content"]
    return text, spans


def opener_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an untemplated text starts with: BOS, or EOS for tokenizers without one (the GPT-2 convention)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    answer: str | None = None,
    answer_ids: Sequence[int] | None = None,
    chat_template: bool = True,
) -> EncodedChat:
    """The chat's tokens as the model sees them, with the content mask.

    The answer (text, or token ids when the model generated them) follows the generation prompt; its
    non-special tokens are content. Without a chat template the turns are plain text after an opener token.
    """
    special = set(special_ids(tokenizer).tolist())
    if chat_template and tokenizer.chat_template:
        ids, content = _tokens(tokenizer, *render(tokenizer, messages), special)
    else:
        ids, content = _tokens(tokenizer, *_untemplated(tokenizer, messages), special)
        ids, content = [opener_id(tokenizer), *ids], [False, *content]
    prompt_length = len(ids)
    if answer_ids is None and answer:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    for token in answer_ids or ():
        ids.append(int(token))
        content.append(int(token) not in special)
    return EncodedChat(ids, content, prompt_length)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> EncodedChat:
    """A plain text (SAE training data): the opener token, then the text's tokens, all of them content."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [opener_id(tokenizer), *ids][:max_tokens]
    special = set(special_ids(tokenizer).tolist())
    return EncodedChat([int(i) for i in ids], [j > 0 and int(i) not in special for j, i in enumerate(ids)], len(ids))


def encode_user_turn(tokenizer: PreTrainedTokenizerBase, text: str, answer: str | None = None) -> EncodedChat:
    """One user turn under the model's default system prompt (what the app sends for a new chat)."""
    return encode_chat(tokenizer, [{"role": "user", "content": text}], answer)
