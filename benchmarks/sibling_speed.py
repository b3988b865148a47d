"""How fast can factorized siblings (layers that read one input: q/k/v, gate/up) run at decode
sizes? Their down factors already share one matmul; this times their *up* products, one launch per
layer today, against one launch for all of them, on one CUDA device, replayed from CUDA graphs.

Variants, per sibling group, token count and kept ratio (each sibling's rank at that ratio):
- ``dense``: one ``nn.Linear`` per sibling (what the dense model runs);
- ``shared``: the runtime today: one down matmul for the group, then one up matmul per sibling;
- ``grouped_mm``: the shared down, then ``torch.nn.functional.grouped_mm`` for every up at once
  (siblings of one output width only);
- ``triton``: the shared down, then one Triton kernel for every up (``--triton``);
- ``dense, streams`` / ``shared, up streams``: the dense products, or the shared down's ups, each on
  a CUDA stream of its own, so that their kernels may run at once (``--streams``).
Each variant's output is checked against ``shared``'s (``dense, streams`` against ``dense``'s).

    python benchmarks/sibling_speed.py --json-out sibling_speed.json     # a CUDA machine
    python benchmarks/sibling_speed.py --from-json sibling_speed.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_wsvd.allocation import uniform_ranks
from hf_wsvd.argtypes import positive_int
from timing import (add_json_arguments, cuda_graphed, device_label, interleaved_seconds, measure_or_publish,
                    median, require_cuda, run_header, speedup)

# Llama 7B: q/k/v read the attention input (4096 → 4096 each), gate/up the MLP input (4096 → 11008)
GROUPS = {"q/k/v": (4096, [4096, 4096, 4096]), "gate/up": (4096, [11008, 11008])}


def triton_grouped_up():
    """A Triton kernel computing every sibling's up product in one launch: each program owns
    ``BLOCK_N`` output columns of one sibling and reduces over that sibling's rank."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(z_ptr, u_ptr, y_ptr, meta_ptr, M, z_stride, y_stride,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        z_col = tl.load(meta_ptr + pid * 4)
        rank = tl.load(meta_ptr + pid * 4 + 1)
        u_off = tl.load(meta_ptr + pid * 4 + 2)
        n0 = tl.load(meta_ptr + pid * 4 + 3)
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, rank, BLOCK_K):
            kk = k + rk
            z = tl.load(z_ptr + rm[:, None] * z_stride + z_col + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < rank), other=0.0)
            u = tl.load(u_ptr + u_off + rn[:, None] * rank + kk[None, :], mask=kk[None, :] < rank, other=0.0)
            acc += tl.dot(z, tl.trans(u))
        tl.store(y_ptr + rm[:, None] * y_stride + n0 + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rm[:, None] < M)

    def launch(z, flat_u, meta, out, block_n, block_k):
        kernel[(meta.shape[0],)](z, flat_u, out, meta, z.shape[0], z.stride(0), out.stride(0),
                                 BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        return out

    return launch


def time_group(name: str, in_features: int, widths: list[int], tokens: int, ratio: float, args) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    dense = [torch.nn.Linear(in_features, n, bias=False, device=device, dtype=dtype) for n in widths]
    ranks = [uniform_ranks({"layer": (in_features, n)}, ratio, multiple=8)["layer"] for n in widths]
    down = torch.randn(sum(ranks), in_features, device=device, dtype=dtype) / in_features**0.5
    ups = [torch.randn(n, r, device=device, dtype=dtype) / r**0.5 for n, r in zip(widths, ranks)]
    calls = {"dense": lambda: [layer(x) for layer in dense]}

    def shared():
        z = F.linear(x, down)
        return [F.linear(part, up) for part, up in zip(z.split(ranks, dim=1), ups)]

    calls["shared"] = shared
    if args.streams:
        side = [torch.cuda.Stream() for _ in widths]

        def concurrently(products: list) -> list[torch.Tensor]:
            """Each ``() -> tensor`` on its own stream, joined back: parallel branches of a CUDA graph."""
            main, outputs = torch.cuda.current_stream(), []
            for stream, product in zip(side, products):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    outputs.append(product())
            for stream, output in zip(side, outputs):
                main.wait_stream(stream)
                output.record_stream(main)
            return outputs

        calls["dense, streams"] = lambda: concurrently([lambda layer=layer: layer(x) for layer in dense])
        calls["shared, up streams"] = lambda: (lambda z: concurrently(
            [lambda part=part, up=up: F.linear(part, up) for part, up in zip(z.split(ranks, dim=1), ups)]))(
            F.linear(x, down))
    if len(set(widths)) == 1:
        cat = torch.cat(ups, dim=1).contiguous()  # width × Σranks; each sibling's up is a block of columns
        offs = torch.tensor(ranks, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        calls["grouped_mm"] = lambda: F.grouped_mm(F.linear(x, down), cat.t(), offs=offs).unbind(0)
    if args.triton:
        launch = triton_grouped_up()
        flat = torch.cat([up.reshape(-1) for up in ups])
        out = torch.empty(tokens, sum(widths), device=device, dtype=dtype)
        for block_n, block_k in args.triton_blocks:
            rows, z_col, u_off, n_off = [], 0, 0, 0
            for n, r in zip(widths, ranks):
                rows += [[z_col, r, u_off + n0 * r, n_off + n0] for n0 in range(0, n, block_n)]
                z_col, u_off, n_off = z_col + r, u_off + n * r, n_off + n
            meta = torch.tensor(rows, device=device, dtype=torch.int64)
            calls[f"triton {block_n}x{block_k}"] = (
                lambda meta, bn, bk: lambda: launch(F.linear(x, down), flat, meta, out, bn, bk).split(widths, dim=1)
            )(meta, block_n, block_k)
    references = {"dense": [y.float() for y in calls["dense"]()], "shared": [y.float() for y in shared()]}
    errors, graphed = {}, {}
    for variant, call in calls.items():
        try:
            if variant not in references:  # dense variants against the dense layers, the others against the factors
                expected = references["dense" if variant.startswith("dense") else "shared"]
                errors[variant] = max(float((g.float() - r).abs().max() / r.abs().max())
                                      for g, r in zip(call(), expected))
            graphed[variant] = cuda_graphed(call, args.iters)
        except Exception as error:  # noqa: BLE001 - a variant this torch or GPU lacks is recorded, not fatal
            errors[variant] = f"{type(error).__name__}: {error}"[:300]
    seconds = {variant: [t / args.iters for t in samples]
               for variant, samples in interleaved_seconds(graphed, args.rounds, 1, 3, device).items()}
    return {"group": name, "in": in_features, "widths": widths, "ranks": ranks, "ratio": ratio, "tokens": tokens,
            "us": {v: 1e6 * median(s) for v, s in seconds.items()},
            "x_dense": {v: speedup(seconds["dense"], s) for v, s in seconds.items()},
            "relative_error": errors}


def measure(args) -> dict:
    rows = [time_group(name, in_features, widths, tokens, ratio, args)
            for name, (in_features, widths) in GROUPS.items() for tokens in args.tokens for ratio in args.ratios]
    return {**run_header(torch.device("cuda"), args), "iters": args.iters, "rows": rows}


def render(payloads: list[dict]) -> str:
    from report import markdown_table

    variants = list(dict.fromkeys(v for run in payloads for row in run["rows"] for v in row["us"]))
    table = markdown_table(
        ["device", "siblings", "tokens", "kept ratio", *[f"{v} µs (×dense)" for v in variants]],
        [[device_label(run), row["group"], row["tokens"], row["ratio"],
          *[f"{row['us'][v]:.1f} ({row['x_dense'][v]:.2f})" if v in row["us"] else "—" for v in variants]]
         for run in payloads for row in run["rows"]])
    rounds = " / ".join(str(run["rounds"]) for run in payloads)
    return (f"{table}\n\nOne CUDA graph of {payloads[0]['iters']} calls per sample, medians of "
            f"{rounds} interleaved rounds (in the order of the rows' runs); bf16.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=positive_int, default=[1, 16])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernel")
    parser.add_argument("--streams", action="store_true",
                        help="also time the siblings' products on one CUDA stream each (dense, and the shared "
                             "down's ups): parallel branches of the captured graph")
    parser.add_argument("--triton-blocks", nargs="+", type=lambda t: tuple(positive_int(v) for v in t.split("x")),
                        default=[(32, 128), (64, 64), (64, 128), (16, 256)], metavar="NxK")
    add_json_arguments(parser)
    args = parser.parse_args()
    if args.triton and not args.from_json:
        # the kernel has one row tile of 16 tokens and no mask on output columns
        if max(args.tokens) > 16:
            parser.error(f"--triton takes at most 16 tokens (its one row tile), not {max(args.tokens)}")
        widths = {n for _, ns in GROUPS.values() for n in ns}
        for block_n, _ in args.triton_blocks:
            if any(n % block_n for n in widths):
                parser.error(f"--triton-blocks {block_n}x…: every output width ({sorted(widths)}) must be a multiple "
                             f"of the tile's {block_n} columns")
    require_cuda(args)  # after the options' own checks, which need no GPU
    measure_or_publish("sibling_speed", args, measure, render)


if __name__ == "__main__":
    main()
