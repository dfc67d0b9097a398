"""ONNX Runtime backend: the embedded default (CPU; CUDA EP where onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

import videoxl
from videoxl.layout import ChunkVisibility
from videoxl.runtime.artifacts import GRAPHS, ArtifactError, OnnxArtifacts, load_onnx_artifacts
from videoxl.runtime.backend import Backend, DecodeOutput, PrefillOutput

log = logging.getLogger(__name__)

NUMPY_FLOAT = {"fp32": np.float32, "fp16": np.float16}


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifacts: OnnxArtifacts | str | Path, *, providers: list[str] | None = None, threads: int = 0) -> None:
        self.artifacts = artifacts if isinstance(artifacts, OnnxArtifacts) else load_onnx_artifacts(artifacts)
        self.config = self.artifacts.config
        self.artifact_dir = self.artifacts.root
        self.max_frames = self.artifacts.max_frames
        if self.artifacts.dtype not in NUMPY_FLOAT:
            raise ValueError(f"ONNX Runtime cannot run {self.artifacts.dtype} graphs here; export with --dtype fp32 or fp16")
        self.float_dtype = np.dtype(NUMPY_FLOAT[self.artifacts.dtype])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = providers or default_providers()
        self.sessions = {
            name: ort.InferenceSession(str(self.artifacts.graph_path(name)), options, providers=self.providers)
            for name in GRAPHS
        }
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._check_inputs()
        log.info("ONNX Runtime backend on %s", self.providers)

    def _check_inputs(self) -> None:
        """Graphs exported by another videoxl version fail here, naming the difference."""
        kv = [f"past_{kind}.{i}" for i in range(self.config.num_hidden_layers) for kind in ("key", "value")]
        expected = {
            "vision": ["pixel_values"],
            "prefill_chunk": ["input_ids", "visual_embeds", "position_ids", "timestamp_query_index", "prefix_len",
                              "window_start", "past_timestamp_index", *kv],
            "decode": ["input_ids", "position_ids", *kv],
            "kv_gather": ["key", "value", "gather_index", "gather_weight"],
        }
        for graph, names in expected.items():
            found = {i.name for i in self.sessions[graph].get_inputs()}
            if found != set(names):
                raise ArtifactError(
                    f"{self.artifacts.graph_path(graph)}: inputs differ from what this videoxl {videoxl.__version__} "
                    f"feeds (missing {sorted(set(names) - found)}, unexpected {sorted(found - set(names))}); "
                    "re-export with `videoxl export`"
                )

    def check_frames(self, frames: int) -> None:
        self.artifacts.check_frames(frames)

    def _run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs[graph], self.sessions[graph].run(None, feed)))

    def _kv_feed(self, keys: list[np.ndarray], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for layer, (k, v) in enumerate(zip(keys, values)):
            feed[f"past_key.{layer}"], feed[f"past_value.{layer}"] = k, v
        return feed

    def _kv_out(self, out: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        layers = range(self.config.num_hidden_layers)
        return [out[f"present_key.{i}"] for i in layers], [out[f"present_value.{i}"] for i in layers]

    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vision", {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})["visual_embeds"]

    def prefill_chunk(self, input_ids, visual_embeds, vis: ChunkVisibility, past_keys, past_values) -> PrefillOutput:
        feed = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "visual_embeds": np.ascontiguousarray(visual_embeds, dtype=self.float_dtype),
            "position_ids": np.arange(vis.start, vis.end, dtype=np.int64),
            "timestamp_query_index": vis.timestamp_query_index,
            "prefix_len": np.array([vis.prefix_len], dtype=np.int64),
            "window_start": np.array([vis.window_start], dtype=np.int64),
            "past_timestamp_index": vis.past_timestamp_index,
            **self._kv_feed(past_keys, past_values),
        }
        out = self._run("prefill_chunk", feed)
        keys, values = self._kv_out(out)
        return PrefillOutput(out["logits"], keys, values)

    def decode(self, input_ids, past_keys, past_values) -> DecodeOutput:
        past = past_keys[0].shape[0]
        feed = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": np.arange(past, past + len(input_ids), dtype=np.int64),
            **self._kv_feed(past_keys, past_values),
        }
        out = self._run("decode", feed)
        keys, values = self._kv_out(out)
        return DecodeOutput(out["logits"], out["attention_mass"], keys, values)

    def gather_kv(self, keys, values, gather_index, gather_weight):
        out = self._run(
            "kv_gather",
            {"key": keys, "value": values, "gather_index": gather_index, "gather_weight": gather_weight},
        )
        return out["mixed_key"], out["mixed_value"]
