"""`videoxl export`: checkpoint -> ONNX graph set (the artifact directory is the contract).

    out/
      vision.onnx          frames (4G, 3, 384, 384) -> embeddings (G, 144, H); standard ops only
      prefill_chunk.onnx   one chunk against its visible past (videoxl::ChunkSparseAttention)
      decode.onnx          a few tokens against the decode cache (capacity buffer + valid length)
      score.onnx           the question's attention mass on the sparse cache (block choice)
      kv_gather.onnx       pools the sparse tier / builds the decode cache, one layer (videoxl::BilevelKVGather)
      config.json, tokenizer.json, tokenizer_config.json, export_manifest.json

Everything is written into a hidden staging sibling and renamed into place at the end
(``videoxl.outdir``): a failed or killed export leaves nothing half-written, and ``--out`` is
refused when replacing it could delete files the exporter did not write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

import videoxl
from videoxl.config import VideoXLConfig
from videoxl.files import file_sha256
from videoxl.outdir import check_out_dir, staged
from videoxl.export.checkpoint import LazyStateDict
from videoxl.export.model import DTYPES, VISUAL_MODULES, VideoXLModel, encode_frames
from videoxl.export.onnx_graph import OPSET, ExternalData
from videoxl.export.onnx_llm import LLMGraphWriter, export_config_check
from videoxl.export.quantize import quantize_projector
from videoxl.graphs import GRAPHS, LLM_WEIGHTS, manifest_entry
from videoxl.ops import DOMAIN, OPSET_VERSION
from videoxl.runtime.artifacts import file_inventory, previous_export_problem
from videoxl.text import SpecialTokens, load_tokenizer
from videoxl.weight_format import WeightFormat, quantized_linears

log = logging.getLogger(__name__)

GRAPH_FILES = {name: contract.file for name, contract in GRAPHS.items()}
MANIFEST = "export_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TWO_GIB = 2**31
# The newest opset the vision export loads in ONNX Runtime with; above it the graphs are broken.
MAX_OPSET = 23
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class VisionGraph(torch.nn.Module):
    """Frames (4G, 3, S, S) -> (G, 144, H); the runtime pads the frame count to a multiple of 4.

    Holds the visual modules only: torch.export lifts every parameter of the module it traces,
    and the LLM's (meta-device, streamed separately) must not become vision initializers.
    """

    def __init__(self, model: VideoXLModel) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.tower, self.sae, self.projector = (getattr(model.model, name) for name in VISUAL_MODULES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_frames(self.cfg, self.tower, self.sae, self.projector, pixel_values)


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


def export_vision(model: VideoXLModel, path: Path, opset: int, *, external_data: bool = False) -> None:
    """The vision graph; with ``external_data`` its weights go to ``<file>.data`` as they are saved."""
    with _quiet_torch_export():
        _export_vision(model, path, opset, external_data)


def _export_vision(model: VideoXLModel, path: Path, opset: int, external_data: bool) -> None:
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
    # Saved straight to external data when asked: no second in-memory copy from load + re-save.
    program.save(str(path), external_data=external_data)


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


def estimated_export_bytes(
    checkpoint_dir: Path, dtype: str, *, external_data: bool | None, weights: WeightFormat = WeightFormat(),
    config: VideoXLConfig | None = None,
) -> tuple[int, bool]:
    """(bytes the export will write, whether weights go to external data), from the safetensors headers.

    Without external data the LLM weights are stored twice (prefill_chunk.onnx and decode.onnx).
    A quantized format's linears count at their stored bytes (``config`` names them): an 8B int4
    fp32 export writes ~8 GB, not the 33 GB its float32 weights would take.
    """
    quantized = {f"{lin.name}.weight": lin for lin in quantized_linears(config)} if weights.quantized and config else {}
    weight_bytes = 0
    for shard in sorted(checkpoint_dir.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(header_len)) if 0 < header_len < 2**27 else None
            except (UnicodeDecodeError, ValueError):
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{shard}: unreadable safetensors file (truncated or damaged header)")
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                count = 1
                for dim in info.get("shape", []):
                    count *= int(dim)
                linear = quantized.get(name)
                weight_bytes += weights.linear_bytes(linear, DTYPE_BYTES[dtype]) if linear else count * DTYPE_BYTES[dtype]
    use_external = external_data if external_data is not None else weight_bytes >= TWO_GIB
    return (weight_bytes if use_external else 2 * weight_bytes) + 2**20, use_external


# Export working memory, calibrated on the full-size synthetic checkpoint (bench/bench_real_size.py;
# measured peak RSS 4.5 GiB in fp16, 5.5 GiB in bf16; this estimate says 6.9 GiB): the process with
# torch loaded, the visual modules' weights times what torch.onnx holds while it exports them
# (module, ONNX model, serialisation), and the largest LLM tensor's conversion (float32 copy, then
# the converted bytes).
EXPORT_BASE_BYTES = 1 * 2**30
VISION_WORKING_FACTOR = 3
LLM_TENSOR_WORKING_BYTES_PER_ELEMENT = 6


@dataclasses.dataclass(frozen=True)
class ExportMemory:
    """What an export holds at its peak, from the safetensors headers alone."""

    vision_weight_bytes: int  # the visual modules in the export dtype (loaded whole for torch.onnx)
    llm_weight_bytes: int  # streamed to disk one tensor at a time, never resident
    largest_llm_tensor: str
    largest_llm_tensor_elements: int

    @property
    def need_bytes(self) -> int:
        return (EXPORT_BASE_BYTES + VISION_WORKING_FACTOR * self.vision_weight_bytes
                + LLM_TENSOR_WORKING_BYTES_PER_ELEMENT * self.largest_llm_tensor_elements)


def export_memory(checkpoint_dir: Path, dtype: str) -> ExportMemory:
    """The export's peak working set: visual modules resident, LLM tensors converted one at a time."""
    from videoxl.export.checkpoint import checkpoint_shapes

    visual_prefixes = tuple(f"model.{name}." for name in VISUAL_MODULES)
    vision = llm = 0
    largest, largest_elements = "", 0
    for key, (shape, _) in checkpoint_shapes(checkpoint_dir).items():
        elements = 1
        for dim in shape:
            elements *= int(dim)
        if key.startswith(visual_prefixes):
            vision += elements
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            llm += elements
            if elements > largest_elements:
                largest, largest_elements = key, elements
    return ExportMemory(vision * DTYPE_BYTES[dtype], llm * DTYPE_BYTES[dtype], largest, largest_elements)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_export_memory(checkpoint_dir: Path, dtype: str, *, available: int | None = None) -> ExportMemory:
    """Refuse, before loading anything, an export whose working set exceeds the available memory."""
    memory = export_memory(checkpoint_dir, dtype)
    available = available_memory_bytes() if available is None else available
    if available is not None and memory.need_bytes > available:
        gib = 2**30
        raise MemoryError(
            f"exporting {checkpoint_dir} in {dtype} needs about {memory.need_bytes / gib:.1f} GiB of memory "
            f"({EXPORT_BASE_BYTES / gib:.0f} GiB base + {VISION_WORKING_FACTOR} x {memory.vision_weight_bytes / gib:.2f} GiB "
            f"of visual weights + the largest LLM tensor {memory.largest_llm_tensor} converting, "
            f"{LLM_TENSOR_WORKING_BYTES_PER_ELEMENT * memory.largest_llm_tensor_elements / gib:.1f} GiB); "
            f"only {available / gib:.1f} GiB is available: close other programs or export on a larger machine"
        )
    return memory


def check_export_request(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: str, opset: int, max_frames: int | None) -> Path:
    """Everything about an export that is knowable before loading the model; returns the resolved --out."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not one of {sorted(DTYPES)}")
    if not OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset} unsupported: the exporter writes opsets {OPSET} to {MAX_OPSET}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
    return check_out_dir(out_dir, is_previous=previous_export_problem, protected=[("--checkpoint", checkpoint_dir)])


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = OPSET,
    max_frames: int | None = None,
    external_data: bool | None = None,
    weights: WeightFormat | str = "fp",
) -> Path:
    """Export the four graphs plus config, tokenizer and manifest. Returns out_dir (resolved).

    ``weights``: "fp", "int8", "int4" (block 128) or a ``WeightFormat`` (``videoxl.weight_format``):
    the LLM, lm_head and projector linears as int8/int4 + scales -> DequantizeLinear -> MatMul.
    Refused before loading the model: a bad dtype, opset or weight format (an int4 block that does
    not divide a linear's width), an --out that could lose files (see ``videoxl.outdir``), a parent
    that is not writable or has too little free space.
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights = WeightFormat.parse(weights) if isinstance(weights, str) else weights
    out_dir = check_export_request(checkpoint_dir, out_dir, dtype=dtype, opset=opset, max_frames=max_frames)
    started = time.perf_counter()
    cfg = VideoXLConfig.from_checkpoint(checkpoint_dir)
    export_config_check(cfg)
    weights.check_widths(cfg)
    tokenizer = load_tokenizer(checkpoint_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    needed_bytes, use_external = estimated_export_bytes(checkpoint_dir, dtype, external_data=external_data, weights=weights, config=cfg)
    memory = check_export_memory(checkpoint_dir, dtype)
    log.info("export working set about %.1f GiB (LLM weights streamed, one tensor at a time); about %.1f GiB to write",
             memory.need_bytes / 2**30, needed_bytes / 2**30)
    with staged(out_dir, needed_bytes=needed_bytes) as staging:
        # Only the visual modules are loaded; the LLM's weights go from the checkpoint's shards to
        # the ONNX external data one tensor at a time, so an 8B export never holds them all.
        model = VideoXLModel.from_pretrained(checkpoint_dir, dtype=dtype, llm_weights=False)
        max_frames = cfg.max_frames if max_frames is None else max_frames
        log.info("exporting vision graph")
        export_vision(model, staging / GRAPH_FILES["vision"], opset, external_data=use_external)
        quantize_projector(staging / GRAPH_FILES["vision"], model.state_dict(), weights, external_data=use_external)
        shared = ExternalData(staging / LLM_WEIGHTS) if use_external else None
        visual_prefixes = tuple(f"model.{name}." for name in VISUAL_MODULES)
        llm_state = LazyStateDict(checkpoint_dir, [k for k in model.state_dict() if not k.startswith(visual_prefixes)])
        writer = LLMGraphWriter(model, dtype, external=shared, weights=weights, state=llm_state)
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
            "weights": weights.manifest_entry(),
            "opset": opset,
            "custom_ops": {"domain": DOMAIN, "version": OPSET_VERSION},
            "graph_contract": manifest_entry(cfg),
            "max_frames": max_frames,
            "special_tokens": dataclasses.asdict(special),
            "graphs": graphs,
            "files": file_inventory(staging),  # every file: bytes checked at each load, sha256 once
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir
