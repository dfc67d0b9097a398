"""The one install fix TensorRT for RTX needs before its ONNX parser can import plugins.

The ``tensorrt_rtx`` wheel ships ``libtensorrt_rtx.so.1`` but not the unversioned
``libtensorrt_rtx.so`` that the ONNX parser dlopens (through its ``$ORIGIN`` rpath) the first
time it meets a plugin node; without it the process aborts with no Python exception. The fix is
a symlink ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` inside the ``tensorrt_rtx_libs``
package folder. Idempotent; a no-op when TensorRT for RTX is not installed.

    python -m videoxl.engines.trt_install
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

LIBS_PACKAGE = "tensorrt_rtx_libs"
UNVERSIONED = "libtensorrt_rtx.so"


class InstallFixError(RuntimeError):
    """The symlink is needed but cannot be created (read-only site-packages, missing library)."""


def rtx_libs_dir() -> Path | None:
    """The folder of the ``tensorrt_rtx_libs`` package, or None when it is not installed."""
    spec = importlib.util.find_spec(LIBS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _versioned_library(libs_dir: Path) -> Path | None:
    """``libtensorrt_rtx.so.<major>`` (the shortest version suffix wins)."""
    pattern = re.compile(re.escape(UNVERSIONED) + r"\.(\d+)$")
    candidates = sorted(p for p in libs_dir.iterdir() if pattern.match(p.name))
    return candidates[0] if candidates else None


def install_fix_applied(libs_dir: Path | None = None) -> bool:
    """True when the parser will find ``libtensorrt_rtx.so`` (or TensorRT for RTX is absent)."""
    libs_dir = libs_dir if libs_dir is not None else rtx_libs_dir()
    if libs_dir is None or sys.platform.startswith("win"):
        return True
    return (libs_dir / UNVERSIONED).exists()  # follows the link: a dangling one is not applied


def apply_install_fix(libs_dir: Path | None = None) -> str:
    """Create the symlink if it is missing or dangling; return a sentence saying what happened."""
    libs_dir = libs_dir if libs_dir is not None else rtx_libs_dir()
    if libs_dir is None:
        return f"TensorRT for RTX is not installed (no {LIBS_PACKAGE} package): nothing to do"
    if sys.platform.startswith("win"):
        return "Windows: the TensorRT for RTX DLLs need no fix"
    link = libs_dir / UNVERSIONED
    target = _versioned_library(libs_dir)
    if target is None:
        raise InstallFixError(f"{libs_dir}: no {UNVERSIONED}.<major> library found; reinstall tensorrt-rtx")
    if link.is_symlink() and link.exists():
        return f"{link} already points to {os.readlink(link)}: nothing to do"
    if link.exists():
        return f"{link} already exists (a regular file): nothing to do"
    try:
        if link.is_symlink():  # dangling, e.g. after an upgrade changed the major version
            link.unlink()
        link.symlink_to(target.name)
    except OSError as err:
        raise InstallFixError(
            f"cannot create {link} -> {target.name} ({err}); create it by hand or run this with write access"
        ) from err
    log.info("created %s -> %s", link, target.name)
    return f"created {link} -> {target.name}"


def main() -> int:
    try:
        print(apply_install_fix())
    except InstallFixError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
