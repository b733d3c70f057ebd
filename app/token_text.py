"""The text of each token as the reader should see it, and which chat turn it belongs to.

Byte-level tokenizers split one character (e.g. Devanagari) over several tokens; decoding tokens
one by one would print replacement characters. `TokenTexts` decodes incrementally (the previous
token as context, as vLLM's detokenizer does): a token that ends inside a character shows no text, and the
character appears on the token that completes it. Special tokens keep their literal text
(`<|im_start|>`); the browser inserts all text with `textContent`, so it is never markup.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
CHATML_START = "<|im_start|>"


@dataclass
class TokenText:
    id: int
    text: str
    special: bool
    role: str
    turn: int

    def payload(self) -> dict:
        return {"id": self.id, "text": self.text, "special": self.special, "role": self.role, "turn": self.turn}


class TokenTexts:
    """Incremental detokenizer plus a ChatML role tracker, fed one token at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, role: str = "prompt") -> None:
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, added in tokenizer.added_tokens_decoder.items() if added.special
        }
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.role = role
        self.turn = 0
        self._reading_role: list[str] | None = None
        self.turn_roles: dict[int, str] = {0: role}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> TokenText:
        self.ids.append(token_id)
        special = token_id in self.special_ids
        if special:
            text = self._decode([token_id])
            self._prefix = self._read = len(self.ids)
        else:
            prefix_text = self._decode(self.ids[self._prefix:self._read])
            full = self._decode(self.ids[self._prefix:])
            if full.endswith(REPLACEMENT) and len(self.ids) - self._read < 4:
                text = ""  # the character continues in the next token
            else:
                text = full[len(prefix_text):]
                self._prefix, self._read = self._read, len(self.ids)
        self._track_role(text, special)
        return TokenText(token_id, text, special, self.role, self.turn)

    def _track_role(self, text: str, special: bool) -> None:
        # ChatML (SmolLM2, Qwen): <|im_start|>role\n ... ; the role name is read from the next tokens.
        if special and text == CHATML_START:
            self.turn += 1
            self.turn_roles[self.turn] = self.role
            self._reading_role = []
            return
        if self._reading_role is not None:
            head, newline, _rest = text.partition("\n")
            self._reading_role.append(head)
            name = "".join(self._reading_role).strip()
            if newline:
                self._reading_role = None
            if name:
                self.role = self.turn_roles[self.turn] = name

    def extend(self, token_ids: list[int]) -> list[TokenText]:
        """Texts of many tokens; each token gets its turn's role (known only after the role name)."""
        texts = [self.push(i) for i in token_ids]
        for item in texts:
            item.role = self.turn_roles[item.turn]
        return texts
