"""Expert parallelism's combine: the gather-sum kernel against the torch loop it replaced.

# T tokens of one rank, k top-k, d hidden, S = T*k rows received back from the experts

After the return all-to-all, each rank holds its S slots' expert outputs [S, d] in sorted order
and sums the k rows of every token: `out[t] = sum_j rows[row_of_slot[t, j]]`, in float32, in a
fixed order. "moeblaze" is `moeblaze.kernels.gather_sum` (each row read once, only out written);
"torch" is `moeblaze.reference.gather_sum_torch` (k index_selects and float32 adds: the combine
before the kernel, and the torch backend's). Both give the same bits. `GB/s` counts the bytes
the sum must move: S*d rows read, T*d written.

    python -m bench.ep_combine    # the model shapes' (T, k, d) in bf16 on CUDA, `tiny` in fp32
                                  # on CPU (the kernel under TRITON_INTERPRET=1)
"""

import functools
import os

import torch

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402
from bench.moe_layer import shape_benchmark  # noqa: E402
from moeblaze.kernels.gather_sum import launch_gather_sum  # noqa: E402
from moeblaze.reference import gather_sum_torch  # noqa: E402

PROVIDERS = ("moeblaze", "torch")
COLUMNS = ("shape", "T", "k", "d", "provider", "ms", "GB/s", "speedup_vs_torch")


def main(argv: list[str] | None = None) -> list[dict]:
    args, device, shapes, env = shape_benchmark("ep_combine", __doc__.split("\n\n")[0], argv)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    rows, path = [], None
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(args.seed)
        num_rows = shape.T * shape.k
        received = torch.randn(num_rows, shape.d, device=device, generator=g).to(dtype)
        # Every slot's row once, in the sorted order of a random routing: a permutation.
        order = torch.randperm(num_rows, device=device, generator=g)
        row_of_slot = order.to(torch.int32).view(shape.T, shape.k)
        runs = {
            "moeblaze": functools.partial(launch_gather_sum, received, row_of_slot),
            "torch": functools.partial(gather_sum_torch, received, row_of_slot),
        }
        if not torch.equal(runs["moeblaze"](), runs["torch"]()):
            raise AssertionError(f"{shape.name}: the kernel's sums differ from the torch loop's")
        moved = (num_rows + shape.T) * shape.d * received.element_size()
        timed = harness.time_providers(
            runs, device=device, baseline="torch", shape=shape.name, T=shape.T, k=shape.k, d=shape.d
        )
        rows += [{**row, "GB/s": moved / row["ms"] / 1e6} for row in timed]
        path = harness.write_results("ep_combine", rows, env, args.out)

    plot_args = dict(
        x=("shape",), series="provider", metrics=("ms",), title=f"EP combine, {env['gpu']}"
    )
    harness.report(rows, COLUMNS, path, **({} if args.no_plot else plot_args))
    return rows


if __name__ == "__main__":
    main()
