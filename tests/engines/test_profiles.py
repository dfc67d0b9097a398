"""Profiles from the graph contract: every free dimension has a range, every range fits the token arithmetic."""

from __future__ import annotations

import pytest

from engine_fixtures import tiny_config
from videoxl import graphs
from videoxl.config import VideoXLConfig
from videoxl.engines.profiles import GRAPH_FILES, GRAPHS, BuildLimits, TokenBudget, dimension_ranges, kv_cache_bytes, shape_input_values

LIMITS = BuildLimits(max_frames=64, chunk_groups=2, window_chunks=1)


def test_graph_list_is_the_contract() -> None:
    assert GRAPHS == tuple(graphs.GRAPHS) == ("vision", "prefill_chunk", "decode", "score", "kv_gather")
    assert GRAPH_FILES == {name: f"{name}.onnx" for name in GRAPHS}


@pytest.mark.parametrize("config", [tiny_config(), VideoXLConfig()], ids=["tiny", "real"])
def test_every_contract_dimension_has_a_range(config: VideoXLConfig) -> None:
    ranges = dimension_ranges(config, LIMITS)
    assert set(ranges) == set(GRAPHS)
    for name, contract in graphs.GRAPHS.items():
        free = {d for spec in contract.inputs for d in spec.shape(config) if isinstance(d, str)}
        assert free <= set(ranges[name]), (name, free - set(ranges[name]))
        for dim, r in ranges[name].items():
            assert 0 <= r.min <= r.opt <= r.max, (name, dim, r)


def test_ranges_follow_the_token_arithmetic() -> None:
    cfg = VideoXLConfig()  # 144 tokens per group, pool stride 4
    t = TokenBudget.of(cfg, LIMITS)
    group = 144 + 16
    assert (t.groups, t.context_tokens, t.sparse_tokens) == (16, 64 + 16 * group, 16 * (16 + 36))
    assert t.scoring_tokens == 64 + 16 * (16 + 36) and t.total_tokens == t.context_tokens + 256 + 256
    assert t.visible_past_tokens == 64 + 16 * 16 + 2 * group  # prefix, every timestamp, a one-chunk window
    ranges = dimension_ranges(cfg, LIMITS)
    assert ranges["prefill_chunk"]["past_tokens"].min == 0  # the prefix chunk has no past
    assert ranges["prefill_chunk"]["timestamp_queries"].min == 0  # none under the streaming rule
    assert ranges["decode"]["past_tokens"].max == t.total_tokens
    assert ranges["score"]["past_tokens"].max == t.scoring_tokens
    assert ranges["kv_gather"]["source_tokens"].max == t.sparse_tokens + t.context_tokens
    assert (ranges["kv_gather"]["pool"].min, ranges["kv_gather"]["pool"].max) == (1, cfg.kv_pool_stride)
    assert ranges["vision"]["frames"].max == 4 * ranges["vision"]["groups"].max


def test_past_len_values_stay_inside_the_past() -> None:
    cfg, t = VideoXLConfig(), TokenBudget.of(VideoXLConfig(), LIMITS)
    values = shape_input_values(cfg, LIMITS)
    ranges = dimension_ranges(cfg, LIMITS)
    for graph in ("prefill_chunk", "decode", "score"):
        low, _, high = values[graph]["past_len"]
        assert low == (0,) and high[0] <= ranges[graph]["past_tokens"].max, graph
    assert values["prefill_chunk"]["past_len"][2] == (t.context_tokens,)


def test_decode_on_prefill_widens_the_prefill_profile_to_the_decode_capacity() -> None:
    """--decode-on-prefill: no decode profile; a decode step (1 token, no visual rows, the whole decode cache
    visible) and the question at once fit the prefill_chunk profile, whose opt stays the chunk's."""
    cfg, t = VideoXLConfig(), TokenBudget.of(VideoXLConfig(), LIMITS)
    plain, shared = dimension_ranges(cfg, LIMITS), dimension_ranges(cfg, LIMITS, decode_on_prefill=True)
    assert set(shared) == set(GRAPHS) - {"decode"}
    prefill = shared["prefill_chunk"]
    assert prefill["past_tokens"].max == prefill["visible_past"].max == t.total_tokens
    assert prefill["chunk_tokens"].max == max(t.chunk_tokens, LIMITS.suffix_tokens)
    assert prefill["chunk_tokens"].min == 1 and prefill["visual_tokens"].min == 0
    assert all(prefill[d].opt == plain["prefill_chunk"][d].opt for d in prefill)
    assert {g: r for g, r in shared.items() if g != "prefill_chunk"} == {g: r for g, r in plain.items() if g not in ("prefill_chunk", "decode")}
    values = shape_input_values(cfg, LIMITS, decode_on_prefill=True)["prefill_chunk"]["past_len"]
    assert values[2] == (t.total_tokens - 1,) and values[2][0] <= prefill["past_tokens"].max


def test_kv_cache_bytes_is_the_video_and_decode_regions() -> None:
    cfg, t = VideoXLConfig(), TokenBudget.of(VideoXLConfig(), LIMITS)
    rows = t.sparse_tokens + t.context_tokens + t.total_tokens
    assert kv_cache_bytes(cfg, LIMITS, "fp16") == graphs.kv_bytes(cfg, rows, 2) == rows * 56 * 1024
