"""Chat encoding shared by the app and the pipeline: the template's tokens, and which of them are content."""

from __future__ import annotations

import pytest

from sae_engine.chat import ChatEncodingError, encode_chat, encode_text, encode_user_turn


def _content_text(tokenizer, encoded) -> str:
    return tokenizer.decode([i for i, c in zip(encoded.ids, encoded.content) if c])


def test_a_user_turn_is_the_apps_template_with_only_the_users_words_counted(tokenizer):
    text = "user assistant\nHow do I kill a stuck process?"
    encoded = encode_user_turn(tokenizer, text)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert encoded.ids == list(expected)
    assert encoded.prompt_length == len(encoded.ids)
    assert _content_text(tokenizer, encoded).strip() == text
    # The default system prompt is in the ids but never counted; so are the role names the user did not type.
    assert "SmolLM" in tokenizer.decode(encoded.ids) and "SmolLM" not in _content_text(tokenizer, encoded)
    assert not encoded.content[0] and not encoded.content[-1]


def test_the_answer_follows_the_generation_prompt_and_counts(tokenizer):
    encoded = encode_user_turn(tokenizer, "Why is the sky blue?", "Because of Rayleigh scattering.")
    prompt = encode_user_turn(tokenizer, "Why is the sky blue?")
    assert encoded.ids[: prompt.prompt_length] == prompt.ids and encoded.prompt_length == prompt.prompt_length
    answer = tokenizer.decode([i for i, c in zip(encoded.ids[prompt.prompt_length :], encoded.content[prompt.prompt_length :]) if c])
    assert answer == "Because of Rayleigh scattering."
    with_eos = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}], answer_ids=[tokenizer.convert_tokens_to_ids("Hello"), tokenizer.eos_token_id])
    assert with_eos.content[-2:] == [True, False]


def test_earlier_turns_count_and_a_system_prompt_does_not(tokenizer):
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you?"},
    ]
    content = _content_text(tokenizer, encode_chat(tokenizer, messages))
    assert "Hello" in content and "Bonjour" in content and "How are you?" in content and "French" not in content


def test_without_a_template_the_turns_are_plain_text(tokenizer):
    encoded = encode_chat(tokenizer, [{"role": "user", "content": "Hello there"}], chat_template=False)
    assert encoded.ids[0] == tokenizer.bos_token_id and not encoded.content[0]
    assert _content_text(tokenizer, encoded) == "Hello there"
    text = encode_text(tokenizer, "Once upon a time", max_tokens=3)
    assert len(text.ids) == 3 and text.content == [False, True, True]


def test_a_template_that_rewrites_the_text_is_refused(tokenizer):
    class Stripping:
        chat_template = "x"

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def apply_chat_template(self, messages, **kwargs):
            return "".join(f"<{m['role']}>{m['content'].strip()}" for m in messages)

    with pytest.raises(ChatEncodingError, match="does not insert them verbatim"):
        encode_user_turn(Stripping(), "  padded  ")
