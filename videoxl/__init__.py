"""videoxl: Video-XL-2 long-video understanding on ONNX Runtime and TensorRT.

Sub-packages: ``videoxl.export`` (PyTorch model, reference inference, ONNX export),
``videoxl.runtime`` (backends and the inference loop; never imports torch),
``videoxl.plugins`` (custom-op kernels, TensorRT plugins), ``videoxl.engines`` (engine builds).
"""

import logging
import os

__version__ = "0.1.0"

# The package logger; VIDEOXL_LOG_LEVEL sets its level. Handlers are the application's business
# (the CLI installs one), so importing videoxl configures no logging.
logger = logging.getLogger("videoxl")
if os.environ.get("VIDEOXL_LOG_LEVEL"):
    logger.setLevel(os.environ["VIDEOXL_LOG_LEVEL"].upper())
