"""Times each implementation choice of `saelab.kernels.backend` on one device, to set its defaults by
measurement: the sparse decode + backward (values, decoder rows) and the encoder gradient through the kept
codes, for torch (embedding bags) vs triton, sparse vs dense encoder-weight gradient, at uniform and skewed
hit patterns (`skewed`: every row's first `--hot` slots on the same latents, as AuxK's early in a run).
With `--autocast` the forward runs under bf16 autocast (as training does with `autocast_dtype=bfloat16`) and
the Triton configurations run with float32 and with bf16 gathered rows (SAELAB_SPARSE_ROWS).

Each configuration runs forward + backward of `sparse_encoder_values` -> `sparse_decode` on codes [B, K];
configurations are interleaved round by round and the median round is reported (ms per call).

    python scripts/bench_kernels.py --device cuda --d-in 768 --n 32768 --k 32 --batch 8192 --json k.json
    python scripts/bench_kernels.py --device cuda --d-in 768 --n 32768 --k 416 --hot 384 --batch 8192
    python scripts/bench_kernels.py --device cuda --d-in 768 --n 32768 --k 32 --batch 8192 --autocast
"""

from __future__ import annotations

import argparse
import functools
import itertools

import benchutil
import torch

from saelab.kernels import SlotPlan, sparse_decode, sparse_encoder_values
from saelab.kernels.backend import override, sparse_backend, triton_available, triton_interpreted


def codes(args: argparse.Namespace, pattern: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, K] > 0, indices [B, K]); `skewed` puts the first --hot slots of every row on latents 0..hot-1."""
    gen = torch.Generator(device).manual_seed(1)
    indices = torch.randint(0, args.n, (args.batch, args.k), generator=gen, device=device)
    if pattern == "skewed":
        indices[:, : args.hot] = torch.arange(args.hot, device=device)
    values = torch.rand(args.batch, args.k, generator=gen, device=device) + 0.1
    return values, indices


def step(
    tensors: dict[str, torch.Tensor],
    values: torch.Tensor,
    indices: torch.Tensor,
    choices: dict[str, str],
    autocast: bool,
) -> None:
    with override(**choices):
        with torch.autocast(values.device.type, dtype=torch.bfloat16, enabled=autocast):
            plan = SlotPlan(indices, tensors["W_dec"].shape[0])
            encoded = sparse_encoder_values(
                values, indices, tensors["x"], tensors["W_enc"], tensors["b_enc"], tensors["b_dec"], plan
            )
            out = sparse_decode(encoded, indices, tensors["W_dec"], tensors["b_dec"], plan)
        out.backward(tensors["upstream"])
    for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
        tensors[name].grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="slots per row")
    parser.add_argument(
        "--hot", type=int, default=16, help="slots per row on shared latents (skewed pattern)"
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast; code values in bf16")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = benchutil.setup_device(args.device, args.threads)
    gen = torch.Generator(device).manual_seed(0)
    tensors = {
        name: torch.randn(*shape, generator=gen, device=device).requires_grad_(
            name != "x" and name != "upstream"
        )
        for name, shape in {
            "x": (args.batch, args.d_in),
            "W_enc": (args.d_in, args.n),
            "b_enc": (args.n,),
            "b_dec": (args.d_in,),
            "W_dec": (args.n, args.d_in),
            "upstream": (args.batch, args.d_in),
        }.items()
    }
    # Triton on CPU only under its interpreter (a slow smoke run of the configurations, not a timing)
    on_triton = triton_available() and (device.type == "cuda" or triton_interpreted())
    backends = ["torch"] + (["triton"] if on_triton else [])
    runs = {}
    rows_choices = ("float32", "autocast") if args.autocast else ("float32",)
    for pattern, backend, encoder_grad, rows in itertools.product(
        ("uniform", "skewed"), backends, ("sparse", "dense"), rows_choices
    ):
        if backend == "torch" and rows != "float32":
            continue  # the rows choice applies to the Triton path only
        choices = {
            "SAELAB_SPARSE_BACKEND": backend,
            "SAELAB_ENCODER_GRAD": encoder_grad,
            "SAELAB_SPARSE_ROWS": rows,
        }
        values, indices = codes(args, pattern, device)
        if args.autocast:
            values = values.to(torch.bfloat16)
        name = f"{pattern} {backend} enc-grad={encoder_grad}" + (f" rows={rows}" if args.autocast else "")
        runs[name] = functools.partial(step, tensors, values, indices, choices, args.autocast)
    for run in runs.values():
        run()
    seconds = benchutil.time_interleaved(runs, args.rounds, device)
    ms = {name: 1e3 * benchutil.median(t) for name, t in seconds.items()}
    benchutil.print_table(
        f"sparse encode + decode, forward + backward, d={args.d_in} n={args.n} K={args.k} B={args.batch}"
        f"{' bf16 autocast' if args.autocast else ''} (default backend here: {sparse_backend(device)})",
        ["configuration", "ms"],
        [[name, f"{value:.2f}"] for name, value in ms.items()],
    )
    benchutil.write_report(
        args.json,
        "bench_kernels",
        device,
        ms=ms,
    )


if __name__ == "__main__":
    main()
