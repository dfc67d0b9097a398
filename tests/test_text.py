"""Tokenizer loading, special tokens, the ChatML video prompt and streaming detokenization."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from videoxl.text import (
    PROMPT_PREFIX,
    SpecialTokens,
    StreamDetokenizer,
    TokenizerError,
    build_prompt,
    group_start_times,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return load_tokenizer(tiny_checkpoint)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# --- loading and special tokens ---------------------------------------------------------------


def test_missing_and_corrupt_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="not a valid tokenizer") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_special_token_ids(tokenizer):
    special = SpecialTokens.from_tokenizer(tokenizer)
    assert special == SpecialTokens(im_start=257, im_end=258, vision_pad=259, endoftext=256)
    expected = {"<|im_start|>": 257, "<|im_end|>": 258, "<|vision_pad|>": 259, "<|endoftext|>": 256}
    for token, token_id in expected.items():
        assert encode(tokenizer, token) == [token_id]
    assert special.stop_ids == {258, 256}


def test_missing_special_tokens_are_named():
    bare = Tokenizer(models.BPE(vocab={"a": 0, "<|im_start|>": 1}, merges=[]))
    with pytest.raises(TokenizerError, match=r"<\|im_end\|>, <\|vision_pad\|>, <\|endoftext\|>"):
        SpecialTokens.from_tokenizer(bare)


@pytest.mark.parametrize(
    "text",
    ["", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "héllo wörld",
     "世界 and 🎉 emoji", "<|im_start|>user\nhi<|im_end|>", "Time 12.5s:", "\x00\x7f control"],
)
def test_tokenizer_round_trip(tokenizer, text):
    assert decode(tokenizer, encode(tokenizer, text)) == text


# --- the prompt -------------------------------------------------------------------------------


def test_group_start_times():
    times = np.arange(10) * 0.5  # 10 frames: groups of 4, the last one partial
    assert group_start_times(times) == [0.0, 2.0, 4.0]
    assert group_start_times(times[:8]) == [0.0, 2.0]
    assert group_start_times([0.0, 1.0, 2.0], frames_per_group=1) == [0.0, 1.0, 2.0]
    assert group_start_times([]) == []


def test_prompt_layout(tokenizer):
    question = "What happens after the dog 🐕 jumps?"
    times = [0.0, 4.0, 12.345]
    layout, special = build_prompt(tokenizer, question, times, tokens_per_group=6)
    ids = layout.input_ids

    assert layout.prefix_len == len(encode(tokenizer, PROMPT_PREFIX))
    assert decode(tokenizer, ids[: layout.prefix_len]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert ids[0] == special.im_start

    stamps = ["Time 0.0s:", "Time 4.0s:", "Time 12.3s:"]
    assert layout.group_starts[0] == layout.prefix_len
    for g, stamp in enumerate(stamps):
        start, visual, end = layout.group_starts[g], layout.group_visual_starts[g], layout.group_ends[g]
        assert decode(tokenizer, ids[start:visual]) == stamp
        assert end - visual == 6 and np.all(ids[visual:end] == special.vision_pad)
        if g + 1 < len(stamps):
            assert layout.group_starts[g + 1] == end

    assert layout.suffix_start == layout.group_ends[-1]
    assert decode(tokenizer, ids[layout.suffix_start :]) == f"\n{question}<|im_end|>\n<|im_start|>assistant\n"

    # The whole prompt is DESIGN §1's template with <image> expanded group by group.
    video = "".join(stamp + "<|vision_pad|>" * 6 for stamp in stamps)
    assert decode(tokenizer, ids) == PROMPT_PREFIX + video + f"\n{question}<|im_end|>\n<|im_start|>assistant\n"

    # Timestamp tokens are exactly the non-visual tokens inside the video span.
    expected_ts = np.zeros(len(ids), dtype=bool)
    for g, stamp in enumerate(stamps):
        expected_ts[layout.group_starts[g] : layout.group_starts[g] + len(encode(tokenizer, stamp))] = True
    np.testing.assert_array_equal(layout.is_timestamp, expected_ts)
    np.testing.assert_array_equal(layout.is_visual, ids == special.vision_pad)
    assert layout.num_tokens == len(ids)


def test_prompt_without_groups(tokenizer):
    layout, _ = build_prompt(tokenizer, "hi", [], tokens_per_group=144)
    assert layout.num_groups == 0 and layout.suffix_start == layout.prefix_len
    assert not layout.is_timestamp.any() and not layout.is_visual.any()


# --- streaming detokenization -----------------------------------------------------------------


def test_stream_detokenizer_holds_back_split_characters(tokenizer):
    text = "a世🎉é!"
    ids = encode(tokenizer, text)
    assert len(ids) == len(text.encode())  # byte-level: every byte is one token
    stream = StreamDetokenizer(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["a", "", "", "世", "", "", "", "🎉", "", "é", "!"]
    assert "".join(pieces) == text == stream.text
    assert stream.flush() == ""


def test_stream_detokenizer_matches_one_shot_decoding(tokenizer):
    rng = np.random.default_rng(0)
    alphabet = list("abc XYZ\n.,") + ["ü", "Ω", "中", "文", "😀", "👍🏽"]
    for _ in range(20):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 30))))
        ids = encode(tokenizer, text)
        stream = StreamDetokenizer(tokenizer)
        streamed = "".join(stream.push(i) for i in ids)
        assert streamed == text
        assert "\ufffd" not in streamed


def test_stream_detokenizer_special_tokens_and_incomplete_tail(tokenizer):
    stream = StreamDetokenizer(tokenizer)
    assert stream.push(ord("o")) == "o"
    assert stream.push(258) == ""  # <|im_end|> is skipped by default
    first_two = "世".encode()[:2]
    assert [stream.push(b) for b in first_two] == ["", ""]
    assert stream.flush() == "\ufffd"  # an unfinished character at the very end
    assert stream.token_ids == [ord("o"), 258, *first_two]

    keep = StreamDetokenizer(tokenizer, skip_special_tokens=False)
    assert keep.push(258) == "<|im_end|>"


def test_chat_question_puts_earlier_turns_after_the_video():
    from videoxl.text import PROMPT_SUFFIX, chat_question

    assert chat_question([("user", "Q1")]) == "Q1"
    question = chat_question([("user", "Q1"), ("assistant", "A1"), ("user", "Q2")])
    assert PROMPT_SUFFIX.format(question=question) == (
        "\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    for turns in ([], [("assistant", "A")], [("user", "Q"), ("user", "Q")], [("user", "Q"), ("assistant", "A")]):
        with pytest.raises(ValueError):
            chat_question(turns)
