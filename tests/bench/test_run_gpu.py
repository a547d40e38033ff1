"""bench/run_gpu.sh on a machine without a GPU: every step's command line is one its benchmark
accepts (flags, and the shapes, providers, stages and workloads it names), checked by parsing it
with the benchmark's own parser and lists, without running it; and every step the script's
default list or its header names exists. A typo there would cost a GPU session the step."""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from bench import hf_model, kernel_profile, moe_layer, tune_expert

SCRIPT = Path(__file__).parents[2] / "bench" / "run_gpu.sh"


def steps() -> dict[str, list[str]]:
    """Step name -> its command (continuation lines joined, $OUT left as it is)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("step ") and not line.startswith("step()"):
            name, _seconds, *command = shlex.split(line.removeprefix("step "))
            found[name] = command
    return found


STEPS = steps()
# The names each benchmark accepts in its comma-list options (bench.moe_layer.parse_list and the
# benchmarks' own checks say the same at run time).
LISTS = {
    "bench.moe_layer": {
        "shapes": moe_layer.SHAPES,
        "providers": moe_layer.PROVIDERS + moe_layer.OPTIONAL_PROVIDERS,
        "modes": moe_layer.MODES,
    },
    "bench.tune_expert": {"shapes": moe_layer.SHAPES, "stages": tune_expert.STAGE_KERNEL},
    "bench.hf_model": {"configs": hf_model.CONFIGS, "providers": hf_model.PROVIDERS},
    "bench.overlap": {"ops": ("ag", "rs")},
    "bench.kernel_profile": {
        "workloads": [f"moe:{s}" for s in moe_layer.SHAPES] + list(kernel_profile.NAMED_WORKLOADS)
    },
}


class Parsed(Exception):
    """Raised with the namespace where a benchmark's main would start its work."""


def parse(module_name: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(real_parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    module = importlib.import_module(module_name)
    try:
        module.main(argv)
    except Parsed as parsed:
        return parsed.args[0]
    except SystemExit as error:  # argparse's answer to a bad command line
        pytest.fail(f"{module_name} refused {argv}: exit {error.code}")
    pytest.fail(f"{module_name}.main({argv}) returned without parsing a command line")


@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_command_parses(name, monkeypatch):
    command = STEPS[name]
    assert command[:2] == ["python", "-m"], command
    module_name, argv = command[2], command[3:]
    if module_name == "pytest":
        assert "-m" in argv and argv[argv.index("-m") + 1] == "gpu"
        return
    args = parse(module_name, argv, monkeypatch)
    for option, allowed in LISTS.get(module_name, {}).items():
        value = getattr(args, option, None)
        if value:
            unknown = [s for s in value.split(",") if s.strip() not in allowed]
            assert not unknown, f"step {name}: --{option} names {unknown}, not in {list(allowed)}"


def test_every_named_step_exists():
    text = SCRIPT.read_text()
    default = re.search(r'STEPS=" \$\{\*:-([^}]*)\} "', text)
    assert default, "the default step list of run_gpu.sh moved"
    assert set(default[1].split()) <= STEPS.keys()
    header = text.split("set -euo pipefail")[0]  # its comment: the log of every step
    logs = set(re.findall(r"\b([\w-]+)\.txt\b", header)) - {"env", "exit_codes"}
    assert logs == STEPS.keys(), (sorted(logs - STEPS.keys()), sorted(STEPS.keys() - logs))
