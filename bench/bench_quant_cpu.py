"""Weight-only int8/int4 on ONNX Runtime's CPU provider: one full-width Qwen2.5-7B layer's linears.

    python bench/bench_quant_cpu.py [--tokens 1 64] [--repeat 20] [--accuracy-levels 4 0] [--formats fp int8 int4]

Builds q/k/v/o + gate/up/down at the real widths (3584, 512, 18944) as MatMul graphs in fp32,
int8 (per channel) and int4 (block 128), the exporter's DequantizeLinear -> MatMul form, and
reports per format: the MatMulNBits nodes in ONNX Runtime's optimized model, the process RSS
growth from loading the session, and ms per call at 1 token (decode) and 64 tokens (prefill);
quantized formats once per MatMulNBits accuracy level (4: int8 activations, ONNX Runtime's
default; 0: float32 activations).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from videoxl.export.quantize import dequantize_attrs, quantized_tensors
from videoxl.weight_format import WeightFormat

H, KV, I = 3584, 512, 18944
LINEARS = [("q", H, H), ("k", H, KV), ("v", H, KV), ("o", H, H), ("gate", H, I), ("up", H, I), ("down", I, H)]


def layer_graph(fmt: WeightFormat, path: Path) -> None:
    """x (n, H) -> every linear of the layer, outputs summed per input width so nothing is pruned."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for name, k, n in LINEARS:
        w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        x = "x" if k == H else "h"
        if fmt.quantized:
            (q_name, payload, dims, elem), (s_name, scale) = quantized_tensors(name, w, fmt.bits, fmt.block_size, np.dtype(np.float32))
            inits += [helper.make_tensor(q_name, elem, dims, payload, raw=True), numpy_helper.from_array(scale, s_name)]
            nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [f"{name}_w"], **dequantize_attrs(fmt.bits, fmt.block_size)))
        else:
            inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_y"]))
        outs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["n", n]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", H]),
                                               helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", I])], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--accuracy-levels", type=int, nargs="+", default=[4], choices=range(5))
    parser.add_argument("--formats", nargs="+", default=["fp", "int8", "int4"], choices=["fp", "int8", "int4"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, level in [(WeightFormat.parse(f), lvl) for f in args.formats for lvl in (args.accuracy_levels if f != "fp" else [None])]:
            path = Path(tmp) / f"{fmt.name}.onnx"
            if not path.is_file():
                layer_graph(fmt, path)
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(Path(tmp) / f"{fmt.name}.opt.onnx")
            options.log_severity_level = 3
            if level is not None:
                options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
            before = rss_bytes()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            grown = rss_bytes() - before
            fused = sum(n.op_type == "MatMulNBits" for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
            disk = sum(p.stat().st_size for p in Path(tmp).glob(f"{fmt.name}.onnx*"))
            timings = []
            for n in args.tokens:
                feeds = {"x": np.ones((n, H), np.float32), "h": np.ones((n, I), np.float32)}
                session.run(None, feeds)
                started = time.perf_counter()
                for _ in range(args.repeat):
                    session.run(None, feeds)
                timings.append(f"{n} tok {1e3 * (time.perf_counter() - started) / args.repeat:.1f} ms")
            label = str(fmt) if level is None else f"{fmt} level {level}"
            print(f"{label:<24} MatMulNBits {fused}/7  file {disk / 2**20:7.1f} MiB  session RSS +{grown / 2**20:7.1f} MiB  " + "  ".join(timings))
            del session
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
