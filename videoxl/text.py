"""Tokenizer, the ChatML video prompt, and streaming detokenization (no torch).

The prompt of DESIGN §1, with the ``<image>`` placeholder expanded per group of 4 frames::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n   prefix
    Time 0.0s: <|vision_pad|> x 144                                                 group 0
    Time 4.0s: <|vision_pad|> x 144                                                 group 1
    ...
    \\n{question}<|im_end|>\\n<|im_start|>assistant\\n                               suffix

Prefix, each timestamp text and the suffix are tokenized separately (the reference tokenizes
the text around ``<image>`` separately), so no BPE merge crosses a boundary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from videoxl.layout import TokenLayout, build_layout

SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
PROMPT_SUFFIX = "\n{question}<|im_end|>\n<|im_start|>assistant\n"


SPECIAL_TOKEN_STRINGS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_pad": "<|vision_pad|>",
    "endoftext": "<|endoftext|>",
}


class TokenizerError(ValueError):
    """The checkpoint's tokenizer is missing, unreadable or lacks a token the model needs."""


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """The fast tokenizer from ``checkpoint_dir/tokenizer.json`` (offline, no hub access)."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{checkpoint_dir}: no tokenizer.json (expected a Hugging Face checkpoint directory)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception on bad files
        message = " ".join(str(err).split())
        raise TokenizerError(f"{path}: not a valid tokenizer file ({message})") from err


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int  # <|im_start|>
    im_end: int  # <|im_end|>: the stop token of the chat template
    vision_pad: int  # <|vision_pad|>: placeholder whose embedding a visual token replaces
    endoftext: int  # <|endoftext|>

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "SpecialTokens":
        ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKEN_STRINGS.items()}
        missing = [SPECIAL_TOKEN_STRINGS[name] for name, token_id in ids.items() if token_id is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special tokens {', '.join(missing)} (not a Qwen2 tokenizer?)")
        return cls(**ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.im_end, self.endoftext})


_MMSS = re.compile(r"(\d{2}:\d{2})")  # exactly two digits, a colon, two digits; anywhere


def times_as_seconds(question: str) -> str:
    """The evaluation's rewrite of "mm:ss" times in a question to "N seconds".

    As the official wrapper (``convert_time_in_prompt`` in ``lmms_eval/models/videoxl2.py``):
    every non-overlapping ``\\d{2}:\\d{2}`` is found, then each found text is replaced
    everywhere by ``{60 * mm + ss} seconds``. Its quirks are kept, since the published scores
    were measured with them: there is no h:mm:ss form ("1:02:03" becomes "1:123 seconds"),
    three-digit minutes lose their first digit ("123:45" becomes "11425 seconds"), and
    seconds over 59 are added as they are ("00:75" becomes "75 seconds").
    """
    for found in _MMSS.findall(question):
        minutes, seconds = found.split(":")
        question = question.replace(found, f"{int(minutes) * 60 + int(seconds)} seconds")
    return question


def group_start_times(frame_timestamps: Sequence[float] | np.ndarray, frames_per_group: int = 4) -> list[float]:
    """Time (s) of the first frame of each group; a final partial group counts as a group."""
    times = np.asarray(frame_timestamps, dtype=np.float64)
    return [float(t) for t in times[::frames_per_group]]


def timestamp_text(seconds: float) -> str:
    return f"Time {seconds:.1f}s:"


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def build_prompt(
    tokenizer: Tokenizer, question: str, group_times: Sequence[float], *, tokens_per_group: int
) -> tuple[TokenLayout, SpecialTokens]:
    """Token ids and layout of the video prompt; visual slots hold ``<|vision_pad|>``."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    layout = build_layout(
        _encode(tokenizer, PROMPT_PREFIX),
        [_encode(tokenizer, timestamp_text(t)) for t in group_times],
        _encode(tokenizer, PROMPT_SUFFIX.format(question=question)),
        image_token_id=special.vision_pad,
        tokens_per_group=tokens_per_group,
    )
    return layout, special


def chat_question(turns: Sequence[tuple[str, str]]) -> str:
    """The ``{question}`` of PROMPT_SUFFIX for a conversation: earlier turns, then the last user turn.

    ``turns`` alternate ``("user", text)`` and ``("assistant", text)``, starting and ending with
    a user turn; the video sits before the first user turn. Earlier turns land in the suffix,
    after the video, so they never touch the prefill of a prepared video::

        \\n{user 1}<|im_end|>\\n<|im_start|>assistant\\n{assistant 1}<|im_end|>\\n<|im_start|>user\\n{user 2}...
    """
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ValueError("a conversation starts and ends with a user turn")
    for (role, _), (next_role, _) in zip(turns, turns[1:]):
        if role == next_role or {role, next_role} != {"user", "assistant"}:
            raise ValueError(f"conversation turns must alternate user and assistant, got {role!r} then {next_role!r}")
    parts = [turns[0][1]]
    for role, text in turns[1:]:
        parts.append(f"<|im_end|>\n<|im_start|>{role}\n{text}")
    return "".join(parts)


class StreamDetokenizer:
    """Turns generated token ids into text as they arrive.

    Byte-level tokens may end inside a multi-byte UTF-8 character; :meth:`push` holds such
    text back (the decoded tail would be U+FFFD) until the character is complete. Decoding
    uses a short window of previous tokens as context, so decoders that treat the first token
    specially still produce the same text as decoding the whole answer at once.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens up to here have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        delta = text[len(context) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        delta = text[len(context) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        return delta

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def text(self) -> str:
        """The whole answer so far, decoded at once."""
        return self._decode(self._ids)
