"""Build of the optional compiled modules (package metadata: pyproject.toml).

`moeblaze._C` (routing plan, router top-k) and `overlap._C` (chunk signals) are built from csrc/
by the top-level CMakeLists.txt when `nvcc` (on PATH, or in $CUDA_HOME / $CUDA_PATH / /usr/local/cuda)
and `cmake` are found; otherwise this is a pure-Python install and the packages use their Triton /
torch paths (pybind11 comes with the build requirements; without build isolation it must be
installed). Environment:

    MOEBLAZE_SKIP_CUDA_BUILD=1    never build them
    MOEBLAZE_FORCE_CUDA_BUILD=1   a missing nvcc or cmake is an error instead of a skip
    MOEBLAZE_CUDA_ARCHS="90a"     CMAKE_CUDA_ARCHITECTURES (default "80;90a")

Once a build starts, a compile error fails the install (that is how CI catches one). Compile jobs
run in parallel: min(cores, available memory / 2 GiB). What was decided is recorded in
kernelbase/_csrc_build.json, which `kernelbase.compiled.status()` reports for modules not built.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODULES = ("moeblaze._C", "overlap._C")
BUILD_RECORD = ROOT / "kernelbase" / "_csrc_build.json"
GIB = 2**30
MEMORY_PER_JOB = 2 * GIB  # nvcc compiling router_topk.cu for two architectures peaks near 1 GiB


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def build_jobs() -> int:
    """min(cores, available memory / MEMORY_PER_JOB), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        return max(1, cores or 1)
    return max(1, min(cores or 1, available // MEMORY_PER_JOB))


def decide() -> tuple[str | None, str]:
    """(nvcc path, "") to build, or (None, why not). Raises if forced and not possible."""
    if os.environ.get("MOEBLAZE_SKIP_CUDA_BUILD") == "1":
        return None, "skipped at install by MOEBLAZE_SKIP_CUDA_BUILD=1"
    nvcc, cmake = find_nvcc(), shutil.which("cmake")
    pybind11 = importlib.util.find_spec("pybind11")  # absent only without build isolation
    found = (("nvcc", nvcc), ("cmake", cmake), ("pybind11", pybind11))
    missing = [name for name, where in found if where is None]
    if not missing:
        return nvcc, ""
    why = f"{' and '.join(missing)} not found at install (PATH, CUDA_HOME, /usr/local/cuda)"
    if os.environ.get("MOEBLAZE_FORCE_CUDA_BUILD") == "1":
        raise SystemExit(f"MOEBLAZE_FORCE_CUDA_BUILD=1 but {why}: cannot build csrc/")
    return None, why


class CMakeExtension(Extension):
    """A module built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once for all modules, then put each where setuptools
    expects it (the package directory for editable installs)."""

    nvcc: str = "nvcc"

    def build_extensions(self) -> None:
        build_dir = Path(self.build_temp).resolve() / "csrc"
        out_dir = build_dir / "modules"
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCSRC_OUTPUT_ROOT={out_dir}",
        ]
        archs = os.environ.get("MOEBLAZE_CUDA_ARCHS")
        if archs:
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        jobs = build_jobs()
        print(f"csrc: building {', '.join(MODULES)} with CMake, {jobs} parallel jobs", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], check=True)
        for ext in self.extensions:
            package, name = ext.name.split(".")
            built = sorted((out_dir / package).glob(f"{name}.*"))
            if len(built) != 1:
                raise RuntimeError(f"CMake built {built} for {ext.name}; expected one module")
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built[0], target)
            os.chmod(target, 0o755)


nvcc, skip_reason = decide()
BUILD_RECORD.write_text(
    json.dumps({m: "to be built" if nvcc else skip_reason for m in MODULES}, indent=2) + "\n"
)
if nvcc:
    CMakeBuild.nvcc = nvcc
else:
    print(
        f"csrc: not building {', '.join(MODULES)}: {skip_reason}; the packages use their "
        "Triton/torch paths (MOEBLAZE_FORCE_CUDA_BUILD=1 makes this an error)",
        flush=True,
    )

setup(
    ext_modules=[CMakeExtension(m) for m in MODULES] if nvcc else [],
    cmdclass={"build_ext": CMakeBuild},
)
