"""CPU tests of the compiled modules (csrc/): the install built them, they import without a GPU
and say why they cannot run, they are current with their sources, a CMake build from scratch
works, and no kernel spills registers (sm_80 and sm_90a, read from the built modules).
"""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compile_report import MODULES, find_cuobjdump, module_path, resource_usage

from kernelbase import compiled

REPO = Path(__file__).resolve().parents[2]
SOURCES = [REPO / "CMakeLists.txt", *sorted((REPO / "csrc").rglob("*.*"))]
KERNELS = {  # every kernel each module must contain, for every architecture
    "moeblaze._C": {
        "routing_plan_kernel<int32>",
        "routing_plan_kernel<int64>",
        *(f"router_topk_kernel<{v}>" for v in (1, 2, 4, 8, 12, 16)),
    },
    "overlap._C": {"write_flag_kernel", "wait_flag_bounded_kernel"},
}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def built_or_skip(name: str) -> Path:
    """The built module's file; skip when the install did not build it (and says why)."""
    path = module_path(name)
    if path is None:
        record = compiled._build_record().get(name, "no build record")
        if record == "to be built":
            pytest.fail(f"setup.py meant to build {name}, but it is missing")
        pytest.skip(f"{name} not built: {record}")
    return path


@pytest.mark.parametrize("name", MODULES)
def test_install_built_the_module_when_nvcc_was_found(name):
    record = compiled._build_record()
    if name not in record:
        pytest.skip("no build record: not installed with this repository's setup.py")
    if record[name] == "to be built":
        importlib.import_module(name)  # the build succeeded and the module loads
    else:
        assert record[name].startswith(("skipped at install", "nvcc", "cmake")), record[name]
        if shutil.which("nvcc") and shutil.which("cmake"):
            assert "SKIP_CUDA_BUILD" in record[name], "nvcc and cmake are here but were not used"


@pytest.mark.parametrize("name", MODULES)
def test_module_is_newer_than_its_sources(name):
    path = built_or_skip(name)
    newer = [str(s.relative_to(REPO)) for s in SOURCES if s.stat().st_mtime > path.stat().st_mtime]
    assert not newer, f"{name} is older than {newer}: rebuild it with `pip install -e .`"


@NO_GPU
@pytest.mark.parametrize("package", ["moeblaze", "overlap"])
def test_without_gpu_the_module_imports_and_status_says_why_not(package):
    name = f"{package}._C"
    built_or_skip(name)
    info = importlib.import_module(name).kernel_info()
    assert info["module"] == name and not info["usable"]
    assert info["architectures"]  # "80,90a" by default (MOEBLAZE_CUDA_ARCHS overrides)
    assert info["cuda_runtime"].endswith("(static)")
    assert "driver" in info["reason"] or "device" in info["reason"], info["reason"]
    assert compiled.load(package) is None
    line = compiled.status()[name]
    assert line.startswith("built for CUDA") and info["reason"] in line
    with pytest.raises(RuntimeError, match=rf"{package}\._C is not available: built for CUDA"):
        compiled.require(package)


def test_status_names_every_module():
    status = compiled.status()
    assert set(status) == set(MODULES)
    assert all(line == "active" or line for line in status.values())
    with pytest.raises(ValueError, match="package must be one of"):
        compiled.load("kernelbase")


@NO_GPU
def test_calling_a_kernel_without_driver_raises_a_clear_error():
    built_or_skip("overlap._C")
    built_or_skip("moeblaze._C")
    overlap_c = importlib.import_module("overlap._C")
    moeblaze_c = importlib.import_module("moeblaze._C")
    cuda_error = r"failed: cuda\w+ \(.+\)"
    with pytest.raises(RuntimeError, match=rf"^overlap\._C\.write_flag: .*{cuda_error}"):
        overlap_c.write_flag(0, 1, 0, 0)
    with pytest.raises(RuntimeError, match=rf"^overlap\._C\.wait_flag_bounded: .*{cuda_error}"):
        overlap_c.wait_flag_bounded(0, 1, 0, 1000, 1, 0, 0)
    with pytest.raises(RuntimeError, match=rf"^moeblaze\._C\.router_topk: .*{cuda_error}"):
        moeblaze_c.router_topk(0, 0, 0, 0, 0, 4, 8, 2, 0, 0, 0, True, 0, 0)
    plan = dict(num_slots=8, num_experts=4, block_m=16, max_tiles=5)
    workspace = moeblaze_c.plan_workspace_numel(8, 4)
    with pytest.raises(RuntimeError, match=rf"^moeblaze\._C\.fill_routing_plan: .*{cuda_error}"):
        moeblaze_c.fill_routing_plan(0, True, *[0] * 9, workspace, *plan.values(), 0, 0)
    ok, why = overlap_c.stream_memops()
    assert not ok and "cuStreamWriteValue32" in why


def test_compiled_arguments_are_checked_before_any_cuda_call():
    moeblaze_c = pytest.importorskip("moeblaze._C") if module_path("moeblaze._C") else None
    if moeblaze_c is None:
        pytest.skip("moeblaze._C not built")
    with pytest.raises(ValueError, match=r"num_experts=2000 must be in \[1, 1024\]"):
        moeblaze_c.fill_routing_plan(0, True, *[0] * 9, 0, 8, 2000, 16, 2001, 0, 0)
    with pytest.raises(ValueError, match=r"max_tiles=3 must be ceil\(num_slots / block_m\)"):
        moeblaze_c.fill_routing_plan(0, True, *[0] * 9, 0, 8, 4, 16, 3, 0, 0)
    with pytest.raises(ValueError, match="workspace has 0 int32 elements, needs"):
        moeblaze_c.fill_routing_plan(0, True, *[0] * 9, 0, 8, 4, 16, 5, 0, 0)
    with pytest.raises(ValueError, match=r"top_k=17 must be in \[1, min\(num_experts, 16\)"):
        moeblaze_c.router_topk(0, 0, 0, 0, 0, 4, 64, 17, 0, 0, 0, True, 0, 0)
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=64"):
        moeblaze_c.router_topk(0, 0, 0, 0, 0, 4, 64, 2, 0, 3, 1, True, 0, 0)


@pytest.mark.parametrize("name", MODULES)
def test_no_kernel_spills_registers(name):
    path = built_or_skip(name)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled copy)")
    rows = resource_usage(path, cuobjdump)
    built_for = importlib.import_module(name).kernel_info()["architectures"]  # "80,90a"
    archs = {f"sm_{a.split('-')[0]}" for a in built_for.split(",")}
    assert {r["arch"] for r in rows} == archs
    for arch in archs:
        assert {r["kernel"] for r in rows if r["arch"] == arch} == KERNELS[name], arch
    spilling = [r for r in rows if r["stack_bytes"] or r["local_bytes"]]
    assert not spilling, (
        f"kernels with local memory (spills or indexed register arrays): {spilling}"
    )
    for r in rows:  # the plan kernel is launched cooperatively with one 512-thread block per SM
        assert r["registers"] <= (128 if r["kernel"].startswith("routing_plan") else 255), r


@pytest.mark.slow
def test_cmake_build_from_scratch(tmp_path):
    """Configure and build CMakeLists.txt in a temporary directory, for sm_90a only (the install
    builds both architectures): skipped when the install already built the modules."""
    if all(module_path(name) for name in MODULES):
        pytest.skip("the install already built both modules with this CMakeLists.txt")
    if not (shutil.which("nvcc") and shutil.which("cmake")):
        pytest.skip("needs nvcc and cmake on PATH")
    pytest.importorskip("pybind11")
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(REPO),
        "-B",
        str(build),
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DCMAKE_CUDA_ARCHITECTURES=90a",
    ]
    jobs = str(max(1, min(os.cpu_count() or 1, 4)))
    for command in (configure, ["cmake", "--build", str(build), "-j", jobs]):
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    for name in MODULES:
        package = name.split(".")[0]
        assert len(list((build / package).glob("_C.*"))) == 1, name
