"""Compile the CUDA kernels into one shared library, ``libvideoxl_kernels.so``.

    python -m videoxl.plugins.build [--arch sm_89 ...] [--out DIR] [--no-ptx] [--force]

Every ``*/*.cu`` under this folder goes into the library (static CUDA runtime, so it loads
on a machine with only the driver). By default it targets every GPU the project supports
(sm_80, 86, 87, 89, 90, 100, 120, plus sm_110 when the found nvcc knows it) with PTX for
the newest; ``--arch`` narrows that (one arch compiles ~8x faster). A build is reused while
the hash of its sources, flags and nvcc version is unchanged (sidecar ``.buildinfo.json``).
nvcc is found through $CUDACXX, then PATH, then the ``nvidia-cuda-nvcc`` wheel
(``pip install videoxl[cuda]``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LIBRARY_NAME = "libvideoxl_kernels.so"
BUILDINFO_SUFFIX = ".buildinfo.json"
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120")
OPTIONAL_ARCHS = ("sm_110",)  # Jetson Thor: only recent nvcc releases know it
COMPILE_FLAGS = (
    "-O3",
    "-std=c++17",
    "-Xcompiler", "-fPIC",
    "-Xcompiler", "-fvisibility=hidden",  # only the VIDEOXL_API launchers are exported
)
LINK_FLAGS = ("-shared", "-cudart", "static")

PLUGIN_DIR = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """The kernel library could not be built."""


class NvccNotFoundError(BuildError):
    """No nvcc anywhere we look."""


@dataclass(frozen=True)
class BuildInfo:
    """What the sidecar file records about a built library."""

    build_hash: str  # sources + flags + archs + nvcc version
    source_hash: str  # sources only: does the library still match this checkout?
    archs: list[str]
    ptx_arch: str | None  # PTX embedded for this arch (JIT-compiled on newer GPUs)
    nvcc_version: str
    build_seconds: float

    def covers(self, arch: str) -> bool:
        """Whether a GPU of this arch can run the library (a cubin, or PTX of an older arch)."""
        if arch in self.archs:
            return True
        return self.ptx_arch is not None and _arch_number(self.ptx_arch) <= _arch_number(arch)


# --- sources ---------------------------------------------------------------------------------


def kernel_sources(plugin_dir: Path = PLUGIN_DIR) -> list[Path]:
    return sorted(plugin_dir.glob("*/*.cu"))


def kernel_headers(plugin_dir: Path = PLUGIN_DIR) -> list[Path]:
    return sorted([*plugin_dir.glob("*/*.h"), *plugin_dir.glob("*/*.cuh")])


def source_hash(plugin_dir: Path = PLUGIN_DIR) -> str:
    digest = hashlib.sha256()
    for path in kernel_sources(plugin_dir) + kernel_headers(plugin_dir):
        digest.update(path.relative_to(plugin_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --- nvcc ------------------------------------------------------------------------------------


def _wheel_nvcc_candidates() -> list[Path]:
    """nvcc shipped by the nvidia-cuda-nvcc wheel (nvidia/cu13/bin, nvidia/cuda_nvcc/bin)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[Path] = []
    for location in spec.submodule_search_locations:
        found.extend(sorted(Path(location).glob("*/bin/nvcc"), reverse=True))
    return found


def find_nvcc() -> Path:
    """$CUDACXX, then nvcc on PATH, then the nvidia-cuda-nvcc wheel."""
    searched = []
    override = os.environ.get("CUDACXX")
    if override:
        if Path(override).is_file() and os.access(override, os.X_OK):
            return Path(override)
        searched.append(f"$CUDACXX={override} (not an executable)")
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    searched.append("PATH")
    for candidate in _wheel_nvcc_candidates():
        if os.access(candidate, os.X_OK):
            return candidate
    searched.append("the nvidia-cuda-nvcc wheel (not installed)")
    raise NvccNotFoundError(
        "nvcc not found (looked in " + ", ".join(searched) + "). Install the CUDA compiler with "
        "`pip install 'videoxl[cuda]'` (nvidia-cuda-nvcc), put a CUDA toolkit's bin/ on PATH, "
        "or set CUDACXX to nvcc."
    )


def _run(command: Sequence[str]) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def nvcc_version(nvcc: Path) -> str:
    match = re.search(r"release (\d+\.\d+)", _run([str(nvcc), "--version"]))
    if not match:
        raise BuildError(f"cannot read the version of {nvcc}")
    return match.group(1)


def supported_archs(nvcc: Path) -> set[str]:
    """sm_XY targets this nvcc can compile (from `nvcc --list-gpu-arch`)."""
    listing = _run([str(nvcc), "--list-gpu-arch"])
    return {"sm_" + m for m in re.findall(r"compute_(\d+[a-z]?)", listing)}


def _arch_number(arch: str) -> int:
    match = re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]?", arch)
    if not match:
        raise BuildError(f"not a CUDA arch: {arch!r} (expected e.g. sm_89)")
    return int(match.group(1))


def resolve_archs(requested: Sequence[str] | None, available: set[str]) -> list[str]:
    """The requested archs (all must be supported), or the defaults this nvcc supports."""
    if requested:
        archs = sorted({a if a.startswith("sm_") else f"sm_{a}" for a in requested}, key=_arch_number)
        missing = [a for a in archs if a not in available]
        if missing:
            raise BuildError(f"this nvcc cannot compile {missing}; it supports {sorted(available, key=_arch_number)}")
        return archs
    archs = [a for a in DEFAULT_ARCHS if a in available]
    skipped = [a for a in DEFAULT_ARCHS if a not in available]
    if skipped:
        log.warning("nvcc does not support %s: building without them (a newer CUDA compiler adds them)", skipped)
    archs += [a for a in OPTIONAL_ARCHS if a in available]
    if not archs:
        raise BuildError(f"this nvcc supports none of {DEFAULT_ARCHS}")
    return sorted(archs, key=_arch_number)


def gencode_flags(archs: Sequence[str], ptx_arch: str | None) -> list[str]:
    flags = []
    for arch in archs:
        number = _arch_number(arch)
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    if ptx_arch:
        number = _arch_number(ptx_arch)
        flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


# --- build -----------------------------------------------------------------------------------


def default_output_dir() -> Path:
    """The package's plugins folder when writable (editable installs), else a user cache dir."""
    if os.access(PLUGIN_DIR, os.W_OK):
        return PLUGIN_DIR
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "videoxl" / "kernels"


def buildinfo_path(library: Path) -> Path:
    return library.with_name(library.name + BUILDINFO_SUFFIX)


def read_buildinfo(library: Path) -> BuildInfo | None:
    path = buildinfo_path(library)
    try:
        return BuildInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        log.warning("%s is unreadable (%s): treating the library as stale", path, err)
        return None


def build_library(
    *,
    archs: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    ptx: bool = True,
    force: bool = False,
    jobs: int | None = None,
    progress: Callable[[str], None] = log.info,
) -> Path:
    """Build (or reuse) libvideoxl_kernels.so in `out_dir`; returns its path."""
    nvcc = find_nvcc()
    version = nvcc_version(nvcc)
    chosen = resolve_archs(archs, supported_archs(nvcc))
    ptx_arch = chosen[-1] if ptx else None
    jobs = jobs or os.cpu_count() or 1
    compile_flags = [*COMPILE_FLAGS, *gencode_flags(chosen, ptx_arch)]

    sources = kernel_sources()
    src_hash = source_hash()
    flags_text = json.dumps([compile_flags, list(LINK_FLAGS), version])
    build_hash = hashlib.sha256((src_hash + flags_text).encode()).hexdigest()[:16]

    out = Path(out_dir) if out_dir is not None else default_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    library = out / LIBRARY_NAME
    info = read_buildinfo(library)
    if not force and library.is_file() and info is not None and info.build_hash == build_hash:
        progress(f"{library} is up to date ({', '.join(chosen)}; hash {build_hash})")
        return library

    progress(
        f"building {LIBRARY_NAME} with nvcc {version} ({nvcc}) for {', '.join(chosen)}"
        + (f" + PTX {ptx_arch}" if ptx_arch else "") + f", {len(sources)} sources, {jobs} threads"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="videoxl-kernels-") as tmp:
        objects = []
        for number, source in enumerate(sources, 1):
            rel = source.relative_to(PLUGIN_DIR).as_posix()
            progress(f"[{number}/{len(sources)}] nvcc {rel}")
            obj = Path(tmp) / (source.parent.name + "_" + source.stem + ".o")
            t0 = time.monotonic()
            _run([str(nvcc), "-c", str(source), "-o", str(obj), *compile_flags, "--threads", str(jobs)])
            progress(f"[{number}/{len(sources)}] {rel} done in {time.monotonic() - t0:.1f} s")
            objects.append(str(obj))
        staged = Path(tmp) / LIBRARY_NAME
        progress(f"linking {library}")
        _run([str(nvcc), *LINK_FLAGS, *objects, "-o", str(staged)])
        shutil.copyfile(staged, library.with_suffix(".so.tmp"))
        os.replace(library.with_suffix(".so.tmp"), library)
    seconds = round(time.monotonic() - started, 1)
    info = BuildInfo(
        build_hash=build_hash, source_hash=src_hash, archs=chosen, ptx_arch=ptx_arch,
        nvcc_version=version, build_seconds=seconds,
    )
    buildinfo_path(library).write_text(json.dumps(asdict(info), indent=2) + "\n")
    progress(f"built {library} in {seconds} s")
    return library


# --- host build against a CUDA emulation (tests, the CPU dry run of bench/gpu_session.sh) -------

_LAUNCH = re.compile(r"(\w+(?:<[\w, ]+>)?)<<<([^;]*?)>>>\(")
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")


def translate_for_host(source: str) -> str:
    """CUDA launch and dynamic-shared syntax -> calls into the host emulation."""
    source = _LAUNCH.sub(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", source)
    return _DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_shared());", source)


def build_host_emulation(emulation_include: Path, out_dir: Path) -> Path:
    """The kernel sources compiled by the host C++ compiler against a CUDA emulation (whose
    headers live in `emulation_include`): same C launchers, host pointers. The tensor-core
    kernel is compiled out (VIDEOXL_HOST_EMULATION); the emulated device reports sm_75."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise BuildError("no host C++ compiler (g++) to build the kernel emulation")
    out_dir = Path(out_dir)
    units = []
    for path in kernel_sources() + kernel_headers():
        target = out_dir / "src" / path.relative_to(PLUGIN_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if path.suffix == ".cu":
            target = target.with_suffix(".cpp")
            text = translate_for_host(text)
            units.append(str(target))
        target.write_text(text)
    library = out_dir / "libvideoxl_kernels_emulated.so"
    _run([
        compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing",
        "-Wno-unknown-pragmas", "-DVIDEOXL_HOST_EMULATION", "-I", str(emulation_include), *units, "-o", str(library),
    ])
    return library


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videoxl.plugins.build", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", metavar="SM",
                        help="target arch, e.g. sm_89 (repeatable; default: every supported GPU)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_output_dir()})")
    parser.add_argument("--no-ptx", action="store_true", help="do not embed PTX for the newest arch")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--jobs", type=int, default=None, help="nvcc --threads (default: CPU count)")
    args = parser.parse_args(argv)
    try:
        library = build_library(
            archs=args.arch, out_dir=args.out, ptx=not args.no_ptx, force=args.force, jobs=args.jobs,
            progress=lambda line: print(line, flush=True),
        )
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
