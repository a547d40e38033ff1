"""Registers, stack (spills), static shared memory of every kernel in the built compiled modules,
per architecture, read with `cuobjdump --dump-resource-usage` (no GPU needed).

    python tests/csrc/compile_report.py

STACK > 0 means local memory: register spills or a register array indexed at run time.
SHARED is static shared memory (on sm_90 it includes the 1 KiB the hardware reserves per block);
dynamic shared memory is per launch: the routing plan takes (16 + 2) * E * 4 bytes per block,
the router 8 warps * 2 * 32 * VPT * 4 bytes with group-limited routing, nothing otherwise.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import triton

MODULES = ("moeblaze._C", "overlap._C")
_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_TEMPLATE_ARGS = {"l": "int64", "i": "int32"}


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, in the CUDA toolkit, or the one Triton ships."""
    candidates = [
        shutil.which("cuobjdump"),
        "/usr/local/cuda/bin/cuobjdump",
        Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump",
    ]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def module_path(name: str) -> Path | None:
    """File of the built module `name` (without importing it), or None."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def kernel_name(mangled: str) -> str:
    """Readable name of a mangled kernel: routing_plan_kernel<int64>, write_flag_kernel, ..."""
    for match in re.finditer(r"_kernel", mangled):
        end = match.end()
        for length in range(len("_kernel") + 1, end):  # the <length><name> of the Itanium ABI
            start, digits = end - length, str(length)
            if mangled[start - len(digits) : start] == digits and mangled[start].isalpha():
                name, rest = mangled[start:end], mangled[end:]
                if rest.startswith("ILi"):  # an int template argument: ILi16EE
                    return f"{name}<{rest[3 : rest.index('E')]}>"
                if rest.startswith("I"):  # a type template argument: IlE
                    return f"{name}<{_TEMPLATE_ARGS.get(rest[1], rest[1])}>"
                return name
    return mangled


def resource_usage(path: Path, cuobjdump: str) -> list[dict]:
    """One row per (architecture, kernel): registers, stack, shared and local bytes."""
    out = subprocess.run(
        [cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    rows, arch = [], None
    # Sections are "Fatbin elf code" (SASS, with resource usage) or "Fatbin ptx code".
    for section in out.split("Fatbin ")[1:]:
        if not section.startswith("elf code"):
            continue
        arch = re.search(r"arch = (\S+)", section)[1]
        for match in _USAGE.finditer(section):
            rows.append(
                dict(
                    arch=arch,
                    kernel=kernel_name(match[1]),
                    registers=int(match[2]),
                    stack_bytes=int(match[3]),
                    shared_bytes=int(match[4]),
                    local_bytes=int(match[5]),
                )
            )
    return sorted(rows, key=lambda r: (r["arch"], r["kernel"]))


def main() -> None:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise SystemExit("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    for name in MODULES:
        path = module_path(name)
        if path is None:
            print(f"{name}: not built")
            continue
        print(f"{name} ({path.name})")
        print(f"  {'arch':8} {'kernel':32} {'regs':>5} {'stack':>6} {'shared':>7} {'local':>6}")
        for r in resource_usage(path, cuobjdump):
            print(
                f"  {r['arch']:8} {r['kernel']:32} {r['registers']:5} {r['stack_bytes']:6} "
                f"{r['shared_bytes']:7} {r['local_bytes']:6}"
            )


if __name__ == "__main__":
    main()
