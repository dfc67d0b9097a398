"""videoxl.engines: exported ONNX -> TensorRT engines with a checked manifest.

    trt_module.py   which TensorRT (standard or for RTX), compute capabilities
    trt_install.py  the one install fix TensorRT for RTX needs for plugins
    profiles.py     profile ranges from frames / chunk groups / window chunks
    build.py        `videoxl build`: parse, profile, build, write atomically
    manifest.py     manifest.json and the check before loading engines
    check.py        `videoxl check`: engines vs ONNX Runtime (polygraphy, needs a GPU)
    cli.py          the two subcommands
"""
