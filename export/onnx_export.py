"""`videoxl export`: checkpoint -> ONNX graph set (the artifact directory is the contract).

    out/
      vision.onnx          frames (4G, 3, 384, 384) -> embeddings (G, 144, H); standard ops only
      prefill_chunk.onnx   one chunk against its visible past (videoxl::ChunkSparseAttention)
      decode.onnx          a few tokens against the decode cache (capacity buffer + valid length)
      score.onnx           the question's attention mass on the sparse cache (block choice)
      kv_gather.onnx       pools the sparse tier / builds the decode cache, one layer (videoxl::BilevelKVGather)
      config.json, tokenizer.json, tokenizer_config.json, export_manifest.json

Everything is written into a temporary sibling directory and renamed into place at the end,
so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

import videoxl
from videoxl.config import VideoXLConfig
from videoxl.files import file_sha256
from videoxl.export.model import DTYPES, VideoXLModel
from videoxl.export.onnx_graph import OPSET, ExternalData
from videoxl.export.onnx_llm import LLMGraphWriter, export_config_check
from videoxl.graphs import GRAPHS, LLM_WEIGHTS, manifest_entry
from videoxl.ops import DOMAIN, OPSET_VERSION
from videoxl.text import SpecialTokens, load_tokenizer

log = logging.getLogger(__name__)

GRAPH_FILES = {name: contract.file for name, contract in GRAPHS.items()}
MANIFEST = "export_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TWO_GIB = 2**31


class VisionGraph(torch.nn.Module):
    """Frames (4G, 3, S, S) -> (G, 144, H); the runtime pads the frame count to a multiple of 4."""

    def __init__(self, model: VideoXLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(pixel_values)


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export's own chatter (missing torchvision ops, pytree deprecations) is not ours to show;
    the logger level and warning filters are restored afterwards, so a caller's settings survive."""
    torch_onnx = logging.getLogger("torch.onnx")
    level = torch_onnx.level
    torch_onnx.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            yield
    finally:
        torch_onnx.setLevel(level)


def export_vision(model: VideoXLModel, path: Path, opset: int) -> None:
    with _quiet_torch_export():
        _export_vision(model, path, opset)


def _export_vision(model: VideoXLModel, path: Path, opset: int) -> None:
    cfg = model.cfg
    groups = torch.export.Dim("groups", min=1, max=4096)
    example = torch.zeros(2 * cfg.frames_per_group, 3, cfg.image_size, cfg.image_size)
    program = torch.onnx.export(
        VisionGraph(model).eval(),
        (example,),
        input_names=["pixel_values"],
        output_names=["visual_embeds"],
        dynamic_shapes={"pixel_values": {0: cfg.frames_per_group * groups}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> None:
    if external_data:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def external_files(model: onnx.ModelProto) -> list[str]:
    """The .data files a graph's initializers live in (relative to the graph)."""
    return sorted(
        {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    )


def describe_io(model: onnx.ModelProto) -> dict:
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    def entry(vi):
        return {"name": vi.name, "shape": dims(vi), "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = OPSET,
    max_frames: int | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export the four graphs plus config, tokenizer and manifest. Returns out_dir."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not one of {sorted(DTYPES)}")
    if opset < OPSET:
        raise ValueError(f"--opset {opset} too old: the graphs need opset >= {OPSET}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    started = time.perf_counter()
    cfg = VideoXLConfig.from_checkpoint(checkpoint_dir)
    export_config_check(cfg)
    tokenizer = load_tokenizer(checkpoint_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = VideoXLModel.from_pretrained(checkpoint_dir, dtype=dtype)
    max_frames = cfg.max_frames if max_frames is None else max_frames

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        use_external = external_data if external_data is not None else weight_bytes >= TWO_GIB
        log.info("exporting vision graph")
        export_vision(model, staging / GRAPH_FILES["vision"], opset)
        if use_external:
            save_model(onnx.load(str(staging / GRAPH_FILES["vision"])), staging / GRAPH_FILES["vision"], external_data=True)
        shared = ExternalData(staging / LLM_WEIGHTS) if use_external else None
        writer = LLMGraphWriter(model, dtype, external=shared)
        for name, build in (
            ("prefill_chunk", lambda: writer.prefill_chunk(special.vision_pad)),
            ("decode", writer.decode),
            ("score", writer.score),
            ("kv_gather", writer.kv_gather),
        ):
            log.info("writing %s graph", name)
            onnx.save_model(build(), str(staging / GRAPH_FILES[name]))  # built one at a time
        if shared is not None:
            shared.close()
        cfg.save(staging / "config.json")
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, staging / name)
        graphs = {}
        for name, file in GRAPH_FILES.items():
            graph = onnx.load(str(staging / file), load_external_data=False)
            graphs[name] = {
                "file": file,
                "sha256": file_sha256(staging / file),
                "external_data": external_files(graph),
                **describe_io(graph),
            }
        manifest = {
            "videoxl_version": videoxl.__version__,
            "model_hash": cfg.model_hash(),
            "dtype": dtype,
            "opset": opset,
            "custom_ops": {"domain": DOMAIN, "version": OPSET_VERSION},
            "graph_contract": manifest_entry(cfg),
            "max_frames": max_frames,
            "special_tokens": dataclasses.asdict(special),
            "graphs": graphs,
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir
