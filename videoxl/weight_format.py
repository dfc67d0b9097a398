"""Weight formats of an export (`videoxl export --weights fp|int8|int4`), defined once.

The exporter quantizes with it, the export and engine manifests record it, and the memory planner
counts bytes with it; this module has no torch and no ONNX so the runtime side can read it.

What each format stores (weight-only, symmetric, no zero point; activations stay float):

    format  linears (LLM q/k/v/o/gate/up/down, projector 0 and 2)     lm_head               embeddings, norms, biases, vision
    fp      export dtype                                              export dtype          export dtype
    int8    int8, one scale per output channel                        int8 per channel      export dtype
    int4    int4 in [-7, 7], one scale per block of B input rows      int8 per channel      export dtype
            and output channel (B = --block-size, default 128)

Graph form, the same for ONNX Runtime and TensorRT (opset 21+)::

    W_q (in, out) int8|int4 --\\
    scale (float)  -----------+-> DequantizeLinear(axis, block_size) -> W (in, out) --> MatMul(x, W)

int4: scale (in / B, out), axis 0, block_size B. int8: scale (out,), axis 1 (per channel).

Why: int8 per channel because TensorRT for RTX keeps per-channel int8 weights as int8 in the
engine (block-wise int8 is not one of its weight-only GEMM forms), and ONNX Runtime fuses both
into MatMulNBits. int4 needs blocks: one scale per channel over 3584 or 18944 inputs loses too
much. lm_head stays int8 even in int4 exports (its errors go straight into the logits that
greedy decoding compares; the usual choice for weight-only int4 LLMs). Embeddings stay float: a
Gather reads one row per token, so they cost memory but no bandwidth, and a quantized Gather is
not a standard ONNX form that both runtimes fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from videoxl.config import VideoXLConfig

FORMATS = ("fp", "int8", "int4")
DEFAULT_BLOCK_SIZE = 128
# ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits only for power-of-two blocks >= 16;
# any other block would silently run as a float weight re-made from int4 on every call.
MIN_BLOCK_SIZE = 16
LM_HEAD = "lm_head"
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class WeightFormatError(ValueError):
    """A bad --weights / --block-size request; the message is one line naming the fix."""


@dataclass(frozen=True)
class Linear:
    """One weight matrix as the graphs store it: (in_features, out_features), the checkpoint's name."""

    name: str  # checkpoint prefix, e.g. "model.layers.0.mlp.down_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class WeightFormat:
    name: str = "fp"  # one of FORMATS
    block_size: int | None = None  # int4 only

    @classmethod
    def parse(cls, name: str, block_size: int | None = None) -> "WeightFormat":
        """Validate a --weights / --block-size pair (the widths are checked against a config later)."""
        if name not in FORMATS:
            raise WeightFormatError(f"--weights {name!r} is not one of {', '.join(FORMATS)}")
        if name != "int4":
            if block_size is not None:
                why = "int8 weights are scaled per output channel" if name == "int8" else "fp weights are not quantized"
                raise WeightFormatError(f"--block-size applies to --weights int4 only ({why})")
            return cls(name)
        block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if block < MIN_BLOCK_SIZE or block & (block - 1):
            raise WeightFormatError(
                f"--block-size {block}: must be a power of two >= {MIN_BLOCK_SIZE} (ONNX Runtime fuses only those into MatMulNBits)"
            )
        return cls(name, block)

    @property
    def quantized(self) -> bool:
        return self.name != "fp"

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.name)

    def bits_of(self, linear: str) -> int | None:
        """Bits of one linear's weight (None: stored float). lm_head is int8 in every quantized format."""
        if not self.quantized:
            return None
        return 8 if linear == LM_HEAD else self.bits

    def check_widths(self, config: VideoXLConfig) -> None:
        """Every int4 linear's input width must be a whole number of blocks."""
        if self.name != "int4":
            return
        bad = sorted({lin.in_features for lin in quantized_linears(config) if self.bits_of(lin.name) == 4 and lin.in_features % self.block_size})
        if bad:
            widths = sorted({lin.in_features for lin in quantized_linears(config) if self.bits_of(lin.name) == 4})
            fits = [b for b in (16, 32, 64, 128, 256) if all(w % b == 0 for w in widths)]
            raise WeightFormatError(
                f"--block-size {self.block_size} does not divide the linear input width(s) {', '.join(map(str, bad))} "
                f"(widths {', '.join(map(str, widths))}); use --block-size {' or '.join(map(str, fits)) or 'none fits'}"
            )

    def linear_bytes(self, linear: Linear, float_bytes: int) -> int:
        """Bytes one linear's weight occupies in the export: quantized values plus scales (bias not included)."""
        k, n, bits = linear.in_features, linear.out_features, self.bits_of(linear.name)
        if bits is None:
            return k * n * float_bytes
        if bits == 8:
            return k * n + n * float_bytes
        return -(-k * n // 2) + (k // self.block_size) * n * float_bytes

    def manifest_entry(self) -> dict:
        """What the export and engine manifests record."""
        if not self.quantized:
            return {"format": "fp"}
        entry = {"format": self.name, "bits": self.bits, "symmetric": True}
        if self.name == "int4":
            entry["block_size"] = self.block_size
            entry["layout"] = "int4 in [-7, 7], scale per (block of block_size input rows, output channel)"
        else:
            entry["layout"] = "int8 in [-127, 127], scale per output channel"
        entry["lm_head"] = "int8 per output channel"
        entry["float"] = "embeddings, norms, biases, vision tower and compressor"
        return entry

    @classmethod
    def from_manifest(cls, entry: dict | None) -> "WeightFormat":
        """An export manifest's "weights" entry (absent in exports that predate it: fp)."""
        if not entry:
            return cls()
        return cls(entry["format"], entry.get("block_size"))

    def __str__(self) -> str:
        return f"int4 (block {self.block_size})" if self.name == "int4" else self.name


def quantized_linears(config: VideoXLConfig) -> list[Linear]:
    """Every linear a quantized format quantizes: the LLM's, lm_head, and the projector's two."""
    h, kv, inter = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    out = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [
            Linear(f"{p}.self_attn.q_proj", h, h), Linear(f"{p}.self_attn.k_proj", h, kv),
            Linear(f"{p}.self_attn.v_proj", h, kv), Linear(f"{p}.self_attn.o_proj", h, h),
            Linear(f"{p}.mlp.gate_proj", h, inter), Linear(f"{p}.mlp.up_proj", h, inter),
            Linear(f"{p}.mlp.down_proj", inter, h),
        ]
    out.append(Linear(LM_HEAD, h, config.vocab_size))
    out += [Linear("model.mm_projector.0", config.vision_hidden_size, h), Linear("model.mm_projector.2", h, h)]
    return out


def weight_bytes(config: VideoXLConfig, fmt: WeightFormat, float_bytes: int, params: dict[str, int]) -> dict[str, int]:
    """Bytes of every module's weights in ``fmt``, from the parameter counts ``params`` (memory_plan).

    The quantized linears are counted at their format's bytes (values + scales); everything else
    (embeddings, norms, biases, the vision tower and compressor) at ``float_bytes``.
    """
    linears = quantized_linears(config)
    projector = [lin for lin in linears if lin.name.startswith("model.mm_projector")]
    llm = [lin for lin in linears if lin not in projector]

    def module(total_params: int, members: list[Linear]) -> int:
        float_params = total_params - sum(lin.in_features * lin.out_features for lin in members)
        return float_params * float_bytes + sum(fmt.linear_bytes(lin, float_bytes) for lin in members)

    return {
        "vision": params["vision"] * float_bytes,
        "compressor": params["compressor"] * float_bytes,
        "projector": module(params["projector"], projector),
        "llm": module(params["llm"], llm),
    }
