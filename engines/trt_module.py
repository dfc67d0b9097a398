"""Which TensorRT this process uses, written once for both flavours.

Standard TensorRT (module ``tensorrt``: datacenter GPUs, Jetson) and TensorRT for RTX (module
``tensorrt_rtx``: RTX-class GPUs; builds engines with no GPU for a named compute capability)
share one Python API. Everything in ``videoxl.engines`` takes the module object returned by
:func:`import_tensorrt` and never imports either name itself.

Compute capabilities are written ``sm_89`` everywhere in videoxl (manifests, CLI, errors).
"""

from __future__ import annotations

import importlib
import logging
import re
from types import ModuleType

log = logging.getLogger(__name__)

STANDARD = "tensorrt"
RTX = "tensorrt_rtx"
FLAVOURS = (STANDARD, RTX)
FLAVOUR_TITLES = {STANDARD: "TensorRT", RTX: "TensorRT for RTX"}
_INSTALL_HINTS = {
    STANDARD: "install standard TensorRT with its libraries (e.g. the tensorrt-cu12/-cu13 wheels or the NVIDIA container)",
    RTX: "pip install tensorrt-rtx (or `pip install videoxl[tensorrt]`), then `python -m videoxl.engines.trt_install`",
}


class TensorRTUnavailableError(ImportError):
    """The requested TensorRT flavour cannot be imported in this environment."""


def import_tensorrt(flavour: str | None = None) -> ModuleType:
    """Return the TensorRT module: ``"tensorrt"``, ``"tensorrt_rtx"``, or None for automatic.

    Automatic picks standard TensorRT when it imports (with its libraries), else TensorRT for RTX.
    """
    if flavour is not None and flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    wanted = (flavour,) if flavour else FLAVOURS
    failures: list[str] = []
    for name in wanted:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError) as err:  # OSError: the bindings import but libnvinfer does not load
            failures.append(f"{FLAVOUR_TITLES[name]} (module {name}): {type(err).__name__}: {err}")
            log.debug("cannot import %s: %s", name, err)
            continue
        if not hasattr(module, "Builder"):  # the PyPI stub package imports but has no bindings
            failures.append(f"{FLAVOUR_TITLES[name]} (module {name}): imported but has no Builder (a stub package?)")
            continue
        return module
    hints = "; ".join(f"for {FLAVOUR_TITLES[n]}: {_INSTALL_HINTS[n]}" for n in wanted)
    raise TensorRTUnavailableError("no usable TensorRT: " + "; ".join(failures) + f". To fix: {hints}")


def flavour_of(trt: ModuleType) -> str:
    """``"tensorrt"`` or ``"tensorrt_rtx"`` for a module returned by :func:`import_tensorrt`."""
    name = trt.__name__.split(".")[0]
    if name not in FLAVOURS:
        raise ValueError(f"{name!r} is not a TensorRT module (expected one of {', '.join(FLAVOURS)})")
    return name


def is_rtx(trt: ModuleType) -> bool:
    return flavour_of(trt) == RTX


def describe(trt: ModuleType) -> str:
    """E.g. ``TensorRT for RTX 1.7.1.116``."""
    return f"{FLAVOUR_TITLES[flavour_of(trt)]} {trt.__version__}"


# --- compute capabilities ------------------------------------------------------------------------
def normalize_target(target: str | tuple[int, int]) -> str:
    """``sm_89`` from ``"sm_89"``, ``"SM89"``, ``"8.9"``, ``"89"`` or ``(8, 9)``."""
    if isinstance(target, tuple):
        major, minor = target
        return f"sm_{major}{minor}"
    text = str(target).strip().lower()
    match = re.fullmatch(r"(?:sm_?)?(\d{1,2})\.?(\d)", text)
    if not match:
        raise ValueError(f"cannot read compute capability {target!r}; write it like sm_89 or 8.9")
    return f"sm_{int(match.group(1))}{match.group(2)}"


def target_version(target: str) -> tuple[int, int]:
    """``(8, 9)`` for ``sm_89``."""
    digits = normalize_target(target)[3:]
    return int(digits[:-1]), int(digits[-1])


def rtx_supported_targets(trt: ModuleType) -> list[str]:
    """The compute capabilities this TensorRT for RTX can build for, e.g. ``['sm_75', ..., 'sm_121']``."""
    names = [n for n in trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d+", n)]
    return sorted((normalize_target(n) for n in names), key=target_version)


def rtx_compute_capability(trt: ModuleType, target: str):
    """The ``trt.ComputeCapability`` member for ``sm_89``; a clear error for unsupported targets."""
    target = normalize_target(target)
    member = getattr(trt.ComputeCapability, "SM" + target[3:], None)
    if member is None:
        raise ValueError(
            f"{describe(trt)} cannot build for {target}; it supports {', '.join(rtx_supported_targets(trt))}"
        )
    return member


def gpu_compute_capability(device: int = 0) -> str | None:
    """``sm_XX`` of CUDA device ``device``, or None when there is no usable GPU (or no cuda-python)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            log.debug("cuda-python is not installed: cannot query the GPU")
            return None
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            log.debug("cuInit failed: %s", err)
            return None
        err, handle = driver.cuDeviceGet(device)
        if err != driver.CUresult.CUDA_SUCCESS:
            log.debug("cuDeviceGet(%d) failed: %s", device, err)
            return None
        attrs = driver.CUdevice_attribute
        err, major = driver.cuDeviceGetAttribute(attrs.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle)
        err2, minor = driver.cuDeviceGetAttribute(attrs.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle)
    except RuntimeError as err:  # driver library missing: cuda-python raises instead of returning a code
        log.debug("no CUDA driver: %s", err)
        return None
    if err != driver.CUresult.CUDA_SUCCESS or err2 != driver.CUresult.CUDA_SUCCESS:
        return None
    return f"sm_{major}{minor}"


_loggers: dict[str, object] = {}
_NO_GPU_NOISE = "cudaError 35"  # TensorRT for RTX probes the CUDA runtime even when it needs no GPU


def trt_logger(trt: ModuleType):
    """One ILogger per TensorRT module (TensorRT keeps the first one it sees), forwarding to logging.

    Errors are also collected in `.errors`, so the caller can put TensorRT's own words into the
    exception it raises (the builder and the runtime both do).
    """
    if trt.__name__ in _loggers:
        return _loggers[trt.__name__]
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level, message) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR) and _NO_GPU_NOISE in message:
                log.debug("TensorRT (no GPU here, expected when building for a named target): %s", message)
            elif level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(message)
                log.debug("TensorRT error: %s", message)
            elif level == severity.WARNING:
                log.info("TensorRT: %s", message)
            else:
                log.debug("TensorRT: %s", message)

    _loggers[trt.__name__] = _Logger()
    return _loggers[trt.__name__]
