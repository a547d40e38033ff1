"""The README's Python examples run as written, on a CPU, in one fresh process.

Blocks meant for `torchrun` or that need a user's model (`megatron_model`) are left out; the
process imports the packages without TRITON_INTERPRET, as a new user would.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_STANDALONE = ("torchrun", "megatron_model")

RUN_BLOCKS = """
import os, sys
os.chdir(sys.argv[1])
for i, block in enumerate(sys.argv[2:]):
    exec(compile(block, f"README python block {i}", "exec"), {"__name__": "__main__"})
print("ok")
"""


def test_readme_examples_run_on_cpu(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if not any(word in b for word in NOT_STANDALONE)]
    assert len(runnable) >= 5, "the README lost its examples"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", RUN_BLOCKS, str(tmp_path), *runnable],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ok"), proc.stderr[-4000:]
