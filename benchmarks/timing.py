"""Timing helpers shared by the speed benchmarks: interleaved rounds and medians, so that a noisy
machine slows every variant alike and ratios come from the same process and the same rounds."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from hf_wsvd.argtypes import fraction, positive_int

T = TypeVar("T")

# The target linears (out × in) of one transformer block and how many of each it holds: MiniLM-L6
# (query/key/value/output, FFN up, FFN down), SmolLM2-135M (the same roles; its key/value are
# narrower and left out) and Llama 7B (q/k/v/o, gate/up, down).
MINILM_LINEARS = {(384, 384): 4, (1536, 384): 1, (384, 1536): 1}
SMOLLM2_LINEARS = {(576, 576): 2, (1536, 576): 2, (576, 1536): 1}
LLAMA_7B_LINEARS = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_seconds(
    calls: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int, device: torch.device | str
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one sample per round: each round runs every callable
    ``iters`` times in turn (after ``warmup`` untimed calls each)."""
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(iters):
                    call()
                synchronize(device)
                samples[name].append((time.perf_counter() - start) / iters)
    return samples


def cuda_graphed(call: Callable[[], object], repeats: int) -> Callable[[], None]:
    """A callable that replays one captured CUDA graph of ``repeats`` calls of ``call``: it times the
    kernels without Python and launch overhead, which is what a graph-captured model (a serving
    engine, ``torch.compile(mode="reduce-overhead")``) runs. Outputs are overwritten in place."""
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                call()
    return graph.replay


def cuda_kernels(call: Callable[[], object], top: int | None = 12) -> tuple[float, list[list]]:
    """Seconds the GPU spent in kernels (and copies) while ``call()`` ran, those replayed from CUDA
    graphs included (the profiler's device records), and the ``top`` kernels by time (None: all) as
    ``[name, milliseconds, count]``: set against the wall time, it tells a run bound by the GPU from
    one bound by the host (Python, launches), and which kernels take the GPU's time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    seconds, ranked = kernel_times(prof)
    return seconds, ranked[:top]


def kernel_times(prof: "torch.profiler.profile") -> tuple[float, list[list]]:
    """The GPU's kernel seconds in a profile, and every kernel as ``[name, milliseconds, count]``,
    slowest first (see :func:`cuda_kernels`)."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            by_name[event.name][0] += event.time_range.elapsed_us() / 1e3
            by_name[event.name][1] += 1
    if not by_name:  # no profiler records: "0% of the wall time" would be the wrong answer
        raise RuntimeError("the profiler recorded no CUDA kernels")
    ranked = sorted(([name, ms, count] for name, (ms, count) in by_name.items()), key=lambda row: -row[1])
    return sum(ms for ms, _ in by_name.values()) / 1e3, ranked


def shapes_profile(call: Callable[[], object], device: torch.device | str) -> "torch.profiler.profile":
    """The profile of one ``call()`` with its ops' input shapes (and the GPU's kernels on CUDA): what
    :func:`matmul_shapes` and, on CUDA, :func:`kernel_times` read."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=True) as prof:
        call()
        synchronize(device)
    return prof


# The two matrices of each product op among its recorded inputs (addmm: the bias first; an ``out=``
# tensor is recorded after them)
PRODUCT_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2)}


def matmul_shapes(prof: "torch.profiler.profile", device: torch.device | str) -> list[dict]:
    """The matrix products of a :func:`shapes_profile` of ``device``, one row per shape (an ``m`` ×
    ``k`` by ``k`` × ``n`` product, with or without a bias): how many, their milliseconds (the GPU's
    kernels on CUDA, else the CPU's) and the rate they reached in TFLOP/s, slowest in total first: it
    tells which product shapes run below the rate of the others."""
    cuda = torch.device(device).type == "cuda"
    totals: dict[tuple[int, int, int], list] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in PRODUCT_OPERANDS:
            left, right = (event.input_shapes[i] for i in PRODUCT_OPERANDS[event.key])
            shape = (left[0], left[1], right[1])
            entry = totals.setdefault(shape, [0, 0.0])
            entry[0] += event.count
            # the op's own kernels: its device_time_total also counts the kernels again under the
            # launch calls nested in it (measured: 360 ms of products in a 7B prefill whose GEMM kernels took 278)
            entry[1] += (event.self_device_time_total if cuda else event.cpu_time_total) / 1e3
    if not totals:
        raise RuntimeError("the profiler recorded no matrix products")
    rows = [{"m": m, "k": k, "n": n, "count": count, "ms": ms,
             "tflops": 2 * m * k * n * count / ms / 1e9 if ms else None} for (m, k, n), (count, ms) in totals.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def shared_down_groups(model: torch.nn.Module) -> int:
    """How many groups of factorized layers of ``model`` share one down matmul (q/k/v, gate/up:
    ``hf_wsvd.share_input_factors``, which ``compress`` and loading apply)."""
    return len({id(m.shared_down) for m in model.modules() if getattr(m, "shared_down", None) is not None})


def token_batch(vocab_size: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Random token ids (above the low ids where tokenizers keep their specials)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(100, vocab_size, (batch, length), generator=generator, device=device)


def verdict(met: bool) -> str:
    """How a table note states whether a target was reached."""
    return "met" if met else "NOT met"


def load_range(loadavg: list[float]) -> str:
    """The 1-minute load average before–after a measurement (``os.getloadavg()``)."""
    return "–".join(f"{v:.1f}" for v in loadavg)


def median(values: list[float]) -> float:
    return statistics.median(values)


def speedup(baseline: list[float], other: list[float]) -> float:
    """Median over rounds of baseline time / other time (> 1: ``other`` is faster)."""
    return statistics.median(b / o for b, o in zip(baseline, other))


def add_shape_arguments(parser, rounds: int, iters: int, shapes_help: str) -> None:
    """The options of a per-shape timing benchmark: ``--device``, ``--shapes``, ``--rounds``,
    ``--iters`` (and the JSON options)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", help=shapes_help)
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--iters", type=positive_int, default=iters)
    add_json_arguments(parser)


def parse_shapes(texts: list[str]) -> list[tuple[int, int]]:
    """``"AxB"`` strings as ``(A, B)`` (the script says which side is which)."""
    return [tuple(int(v) for v in text.lower().split("x")) for text in texts]


def run_header(device: torch.device, args) -> dict:
    """What every run of a per-shape benchmark records besides its rows."""
    from report import environment

    return {"device": device.type, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "environment": environment()}


def add_threads_argument(parser) -> None:
    """``--threads``: the torch CPU threads of a benchmark that computes on the CPU (default 1)."""
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core machine more threads spin against each other)")


def add_json_arguments(parser) -> None:
    parser.add_argument("--json-out", help="measure and write the measurement here (no docs update)")
    parser.add_argument("--from-json", nargs="+", help="render measurement files (or a published results file)")


def _number(text: str, inside, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not inside(value):
        raise argparse.ArgumentTypeError(f"{value:g} is not {what}")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (seconds, a step size)."""
    return _number(text, lambda v: 0 < v < float("inf"), "a number > 0")


kept_fraction = functools.partial(fraction, name="kept ratio")  # an argparse type: a number in (0, 1]


def reduction(text: str) -> float:
    """An argparse type: a fraction of the parameters removed, in (0, 1)."""
    return _number(text, lambda v: 0 < v < 1, "a reduction in (0, 1)")


def listed(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type: comma-separated values of ``kind``, at least one."""
    def values(text: str) -> list[T]:
        parts = [kind(part) for part in text.split(",") if part]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} holds no value: give comma-separated values")
        return parts
    return values


def require_cuda(args, device: str = "cuda") -> None:
    """Exit in one line, before any work, where the measurement would run on CUDA (``args.device``,
    else ``device``) and this machine has none; rendering ``--from-json`` files needs no GPU."""
    wanted = getattr(args, "device", None) or device
    if not getattr(args, "from_json", None) and torch.device(wanted).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: measuring on {wanted} needs a CUDA GPU and this machine has none: "
                         "run it on one, or render earlier runs with --from-json")


def read_json(path: str) -> dict:
    """The measurement file ``path`` (a JSON object), or exit in one line naming what is wrong with it."""
    try:
        payload = json.loads(Path(path).read_text())
    except OSError as error:
        raise SystemExit(f"--from-json {path!r}: {error.strerror or error}") from None
    except ValueError as error:
        raise SystemExit(f"--from-json {path!r} is not JSON ({error}): pass a file a run wrote with --json-out") from None
    if not isinstance(payload, dict):
        raise SystemExit(f"--from-json {path!r} holds a JSON {type(payload).__name__}, not a run's object: pass a file "
                         "a run wrote with --json-out")
    return payload


def read_fields(read: Callable[[Any], T], payloads: Any, name: str, loaded: Any = True) -> T:
    """``read(payloads)`` (a table, merged runs); where the runs were ``loaded`` from files, exit in one
    line if one lacks a field it reads (a file of another benchmark, or of an older layout), where a
    run just measured would raise as it is (a bug to see whole)."""
    if not loaded:
        return read(payloads)
    try:
        return read(payloads)
    except KeyError as error:
        raise SystemExit(f"a run lacks the field {error.args[0]!r} that {name}.py reads: pass files that {name}.py "
                         "wrote") from None


def with_key(runs: list[dict], key: str) -> list[dict]:
    """The runs that measured ``key`` (a ``--from-json`` file may hold other benchmarks' runs too,
    as the results of the former all-in-one ``speed.py`` do)."""
    found = [run for run in runs if run.get(key)]
    if not found:
        raise SystemExit(f"no {key!r} measurements in these runs: measure them, or pass --from-json files that hold them")
    return found


def loaded_runs(paths: list[str]) -> list[dict]:
    """The measurements in ``paths`` (a published results file holds them under ``"runs"``)."""
    return [run for payload in (read_json(path) for path in paths) for run in payload.get("runs", [payload])]


def measured_runs(args, measure) -> list[dict]:
    """``--from-json``: the measurements in those files; else ``[measure(args)]``, also written to
    ``--json-out`` when given."""
    if args.from_json:
        return loaded_runs(args.from_json)
    payload = measure(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    return [payload]


def measure_or_publish(name: str, args, measure, render, figure=None, append: bool = False) -> None:
    """The end of a measuring script: measure (or load ``--from-json``), then print the table
    (``--json-out``: a run made elsewhere, published later) or publish every run as ``name``. Each
    run keeps the environment (and command) it was measured in; a table published from files says
    how to publish it again from its results file, and that file given alone is written back as it
    is (its table rendered again: a faithful renderer changes nothing). ``figure(runs, path)`` draws
    the table's figure at ``benchmarks/results/<name>.png`` where the table is published; with
    ``append``, a run measured here is published after the runs already published as ``name``."""
    from report import publish, republished, results_file

    earlier = loaded_runs([str(results_file(name))]) if append and not (args.from_json or args.json_out) else []
    runs = earlier + measured_runs(args, measure)  # read before measuring: a missing file stops no later
    table = read_fields(render, runs, name, args.from_json or earlier)
    if args.json_out:
        print(table)
        return
    if figure:
        figure(runs, results_file(name, ".png"))
    if args.from_json and [Path(path).resolve() for path in args.from_json] == [results_file(name).resolve()]:
        payload = read_json(args.from_json[0])
    else:  # from files: the command that publishes them again; measured here: this run's
        payload = {"environment": republished(name) if args.from_json else runs[-1]["environment"], "runs": runs}
    publish(name, payload, table)


def device_label(run: dict) -> str:
    """Where a measurement ran: the GPU's name, or the CPU with its torch thread count."""
    return run["environment"].get("cuda") or f"CPU ({run['threads']} threads)"
