"""JSON mode and JSON-schema mode for local generation: prefix checkers for constrained decoding.

`JsonPrefix` (response_format json_object) accepts characters one at a time and refuses the first one that cannot continue a
JSON object; the generator keeps only candidate tokens whose characters it accepts, and stops when
the object is complete. State is a handful of small fields, so a copy per candidate is cheap.
Whitespace between tokens is limited to short runs: a small model otherwise tends to fill its whole
token budget with blank lines, which is valid JSON but never ends.
"""

from __future__ import annotations

import json

_WHITESPACE = " \t\n\r"
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_COMPLETE_NUMBER = ("zero", "int", "frac", "exp_int")
MAX_WHITESPACE_RUN = 8

# states
VALUE = "value"  # a value must start (after ':' , ',' in an array, or '[')
VALUE_OR_CLOSE = "value_or_close"  # right after '[': a value or ']'
KEY_OR_CLOSE = "key_or_close"  # right after '{': a key or '}'
KEY = "key"  # after ',' in an object
COLON = "colon"
AFTER_VALUE = "after_value"  # ',' or the closing bracket of the enclosing container
STRING = "string"
ESCAPE = "escape"
UNICODE = "unicode"
NUMBER = "number"
LITERAL = "literal"
DONE = "done"


class JsonPrefix:
    """The state of a JSON object being written (the top-level value must be an object)."""

    __slots__ = ("number", "pending", "stack", "state", "string_is_key", "whitespace_run")

    def __init__(self) -> None:
        self.state = "start"
        self.stack: list[str] = []
        self.string_is_key = False
        self.pending = ""  # the rest of a literal, or the hex digits still due in \\uXXXX
        self.whitespace_run = 0
        self.number = ""  # the phase of a number being written (sign, zero, int, dot, frac, exp, ...)

    def copy(self) -> JsonPrefix:
        other = JsonPrefix.__new__(JsonPrefix)
        other.state, other.stack, other.string_is_key = self.state, list(self.stack), self.string_is_key
        other.pending, other.number, other.whitespace_run = self.pending, self.number, self.whitespace_run
        return other

    @property
    def complete(self) -> bool:
        return self.state == DONE

    def feed_text(self, text: str) -> bool:
        return all(self.feed(char) for char in text)

    def _open(self, char: str) -> None:
        self.stack.append(char)
        self.state = KEY_OR_CLOSE if char == "{" else VALUE_OR_CLOSE

    def _close(self) -> None:
        self.stack.pop()
        self.state = AFTER_VALUE if self.stack else DONE

    def _start_value(self, char: str) -> bool:
        if char in "{[":
            self._open(char)
        elif char == '"':
            self.state, self.string_is_key = STRING, False
        elif char == "-" or char.isdigit():
            self.state, self.number = NUMBER, "sign" if char == "-" else ("zero" if char == "0" else "int")
        elif char in _LITERALS:
            self.state, self.pending = LITERAL, _LITERALS[char][1:]
        else:
            return False
        return True

    def _number_step(self, char: str) -> str | None:
        """The number's next phase after `char`, or None when `char` cannot extend it."""
        phase = self.number
        if char.isdigit():
            return {
                "sign": "zero" if char == "0" else "int",
                "int": "int",
                "dot": "frac",
                "frac": "frac",
                "exp": "exp_int",
                "exp_sign": "exp_int",
                "exp_int": "exp_int",
            }.get(phase)
        if char == "." and phase in ("zero", "int"):
            return "dot"
        if char in "eE" and phase in ("zero", "int", "frac"):
            return "exp"
        if char in "+-" and phase == "exp":
            return "exp_sign"
        return None

    def feed(self, char: str) -> bool:
        if self.state not in (STRING, ESCAPE, UNICODE) and char in _WHITESPACE:
            self.whitespace_run += 1
            if self.whitespace_run > MAX_WHITESPACE_RUN:
                return False
        else:
            self.whitespace_run = 0
        state = self.state
        if state == "start":
            if char in _WHITESPACE:
                return True
            if char == "{":
                self._open(char)
                return True
            return False
        if state == DONE:
            return char in _WHITESPACE
        if state == STRING:
            if char == '"':
                self.state = COLON if self.string_is_key else AFTER_VALUE
            elif char == "\\":
                self.state = ESCAPE
            elif ord(char) < 0x20:
                return False
            return True
        if state == ESCAPE:
            if char not in _ESCAPES:
                return False
            self.state, self.pending = (UNICODE, "xxxx") if char == "u" else (STRING, "")
            return True
        if state == UNICODE:
            if char not in _HEX:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self.state = STRING
            return True
        if state == LITERAL:
            if not self.pending or char != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self.state = AFTER_VALUE
            return True
        if state == NUMBER:
            phase = self._number_step(char)
            if phase is not None:
                self.number = phase
                return True
            if self.number not in _COMPLETE_NUMBER:
                return False
            self.state = AFTER_VALUE
            return self.feed(char)
        if char in _WHITESPACE:
            return True
        if state in (VALUE, VALUE_OR_CLOSE):
            if state == VALUE_OR_CLOSE and char == "]":
                self._close()
                return True
            return self._start_value(char)
        if state in (KEY, KEY_OR_CLOSE):
            if state == KEY_OR_CLOSE and char == "}":
                self._close()
                return True
            if char == '"':
                self.state, self.string_is_key = STRING, True
                return True
            return False
        if state == COLON:
            if char == ":":
                self.state = VALUE
                return True
            return False
        if state == AFTER_VALUE:
            container = self.stack[-1]
            if char == ",":
                self.state = KEY if container == "{" else VALUE
                return True
            if (char == "}" and container == "{") or (char == "]" and container == "["):
                self._close()
                return True
            return False
        raise AssertionError(f"unknown state {state}")


class SchemaError(ValueError):
    """A JSON schema uses something the local constrained decoder does not support."""


class _Incomplete(Exception):
    """The text ended where the document may still continue."""


class _Mismatch(Exception):
    """The text cannot be (the start of) a document of the schema."""


def _literal(text: str, pos: int, literal: str) -> int:
    available = text[pos : pos + len(literal)]
    if available != literal[: len(available)]:
        raise _Mismatch
    if len(available) < len(literal):
        raise _Incomplete
    return pos + len(literal)


class _Node:
    def parse(self, text: str, pos: int) -> int:
        raise NotImplementedError


class _Integer(_Node):
    def __init__(self, low: int, high: int) -> None:
        if high - low > 100_000:
            raise SchemaError("integer: minimum and maximum must be set and at most 100000 apart")
        self.values = [str(v) for v in range(low, high + 1)]

    def parse(self, text: str, pos: int) -> int:
        end = pos
        while end < len(text) and (text[end].isdigit() or (end == pos and text[end] == "-")):
            end += 1
        digits = text[pos:end]
        if end == len(text):
            if any(v.startswith(digits) for v in self.values):
                raise _Incomplete
            raise _Mismatch
        if digits not in self.values:
            raise _Mismatch
        return end


class _Boolean(_Node):
    def parse(self, text: str, pos: int) -> int:
        for literal in ("true", "false"):
            try:
                return _literal(text, pos, literal)
            except _Mismatch:
                continue
        raise _Mismatch


class _String(_Node):
    def parse(self, text: str, pos: int) -> int:
        pos = _literal(text, pos, '"')
        while pos < len(text):
            char = text[pos]
            if char == '"':
                return pos + 1
            if char == "\\" or ord(char) < 0x20:
                raise _Mismatch
            pos += 1
        raise _Incomplete


class _Array(_Node):
    def __init__(self, item: _Node, low: int, high: int | None) -> None:
        self.item, self.low, self.high = item, low, high

    def parse(self, text: str, pos: int) -> int:
        pos = _literal(text, pos, "[")
        count = 0
        while True:
            may_close = count >= self.low
            may_continue = self.high is None or count < self.high
            if pos == len(text):
                raise _Incomplete
            if may_close and text[pos] == "]":
                return pos + 1
            if not may_continue:
                raise _Mismatch
            if count:
                pos = _literal(text, pos, ",")
            pos = self.item.parse(text, pos)
            count += 1


class _Object(_Node):
    def __init__(self, properties: list[tuple[str, _Node]]) -> None:
        self.properties = properties

    def parse(self, text: str, pos: int) -> int:
        pos = _literal(text, pos, "{")
        for i, (key, node) in enumerate(self.properties):
            pos = _literal(text, pos, ("," if i else "") + json.dumps(key) + ":")
            pos = node.parse(text, pos)
        return _literal(text, pos, "}")


def _compile(schema: dict, path: str) -> _Node:
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        required = schema.get("required", list(properties))
        if set(required) != set(properties):
            raise SchemaError(f"{path}: every property must be required")
        if schema.get("additionalProperties", False) is not False:
            raise SchemaError(f"{path}: additionalProperties must be false")
        return _Object([(key, _compile(value, f"{path}.{key}")) for key, value in properties.items()])
    if kind == "array":
        if "items" not in schema:
            raise SchemaError(f"{path}: an array needs items")
        return _Array(_compile(schema["items"], f"{path}[]"), int(schema.get("minItems", 0)), schema.get("maxItems"))
    if kind == "integer":
        if "minimum" not in schema or "maximum" not in schema:
            raise SchemaError(f"{path}: an integer needs minimum and maximum")
        return _Integer(int(schema["minimum"]), int(schema["maximum"]))
    if kind == "boolean":
        return _Boolean()
    if kind == "string":
        return _String()
    raise SchemaError(f"{path}: unsupported type {kind!r} (supported: object, array, integer, boolean, string)")


class SchemaPrefix:
    """A document of a JSON schema being written, in one canonical, compact layout (`{"k":[1,2]}`,
    as `json.dumps(separators=(",", ":"))`: no whitespace, which also spends the fewest tokens),
    checked by re-parsing the text so far.

    Supported: objects whose properties are all required (written in schema order, no others),
    arrays (minItems/maxItems), integers with minimum and maximum, booleans and plain strings.
    """

    __slots__ = ("root", "text")

    def __init__(self, schema: dict, root: _Node | None = None) -> None:
        self.root = root or _compile(schema, "schema")
        self.text = ""

    def copy(self) -> SchemaPrefix:
        other = SchemaPrefix.__new__(SchemaPrefix)
        other.root, other.text = self.root, self.text
        return other

    def _status(self, text: str) -> str:
        try:
            end = self.root.parse(text, 0)
        except _Incomplete:
            return "prefix"
        except _Mismatch:
            return "invalid"
        return "complete" if end == len(text) else "invalid"

    @property
    def complete(self) -> bool:
        return self._status(self.text) == "complete"

    def feed_text(self, text: str) -> bool:
        if not text or self._status(self.text + text) == "invalid":
            return False
        self.text += text
        return True
