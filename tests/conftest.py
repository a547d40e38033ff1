"""Test setup: run Triton kernels under the interpreter when no GPU is present.

`TRITON_INTERPRET=1` must be in the environment before any module that defines a
`@triton.jit` kernel is imported, so it is set here, before the packages under test load.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_patching

    interpreter_patching.install()  # a third less interpreter time; results unchanged


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
