"""The optional compiled module built from `csrc/` (package metadata: pyproject.toml).

The CUDA C++ part is optional. It is built only when all of these hold:
  - the environment variable MOEBLAZE_BUILD_CSRC=1 is set,
  - the top-level CMakeLists.txt exists,
  - `cmake` and `nvcc` are on PATH.
Otherwise this is a pure-Python install and the packages use their Triton / torch paths.

    MOEBLAZE_BUILD_CSRC=1 pip install --no-build-isolation -e .
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by CMake, not by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the top-level CMakeLists.txt into the extension's output directory."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--config", config, "-j"], check=True)


def _csrc_build_requested() -> bool:
    if os.environ.get("MOEBLAZE_BUILD_CSRC") != "1":
        return False
    missing = [
        what
        for what, found in [
            ("CMakeLists.txt", (ROOT / "CMakeLists.txt").is_file()),
            ("cmake", shutil.which("cmake") is not None),
            ("nvcc", shutil.which("nvcc") is not None),
        ]
        if not found
    ]
    if missing:
        # Asked for explicitly but not possible: say why once, then install pure Python.
        print(f"MOEBLAZE_BUILD_CSRC=1 but {', '.join(missing)} not found: skipping csrc/")
        return False
    return True


build_csrc = _csrc_build_requested()

# Metadata and dependencies are in pyproject.toml; this adds only the optional compiled module.
setup(
    ext_modules=[CMakeExtension("moeblaze._C")] if build_csrc else [],
    cmdclass={"build_ext": CMakeBuild} if build_csrc else {},
)
