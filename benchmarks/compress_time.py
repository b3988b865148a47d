"""Wall time of compression through the real CLI: ``hf-wsvd compress`` of the shipped MiniLM-L6
SST-2 classifier at kept ratio 0.5 with ``fwsvd`` and ``fisher_whiten`` (512 Fisher samples), run
as subprocesses, per ``OMP_NUM_THREADS``, with the load average.

    python benchmarks/compress_time.py --json-out compress_time.json
    python benchmarks/compress_time.py --from-json compress_time.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MINILM, ROOT, SST2_TRAIN
from hf_wsvd.argtypes import positive_int
from timing import add_json_arguments, load_range, measure_or_publish, median, verdict, with_key

CLI_TARGET_SECONDS = 60.0  # issue #8: hf-wsvd compress MiniLM fwsvd 512 samples, 2-core CPU


def time_cli(method: str, threads: str, workdir: Path, args) -> dict:
    """Wall time of ``hf-wsvd compress`` of MiniLM at kept ratio 0.5, as a subprocess
    (``threads``: "default", or the ``OMP_NUM_THREADS`` it runs with), with the load average."""
    executable = shutil.which("hf-wsvd")
    options = ["--method", method, "--param-ratio", "0.5", "--data", str(args.data), "--text-columns", "sentence",
               "--num-samples", str(args.cli_samples), "--overwrite"]
    command = [executable] if executable else [sys.executable, "-m", "hf_wsvd.cli"]
    command += ["compress", str(args.model), str(workdir / method), *options]
    shown = ["hf-wsvd", "compress", os.path.relpath(args.model, ROOT), "OUT",
             *(os.path.relpath(o, ROOT) if o == str(args.data) else o for o in options)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    # "default" leaves OMP_NUM_THREADS as this process has it: a value set here is what the run used
    used = env.get("OMP_NUM_THREADS", threads)
    if used != "default":
        shown = [f"OMP_NUM_THREADS={used}", *shown]
    runs, load = [], os.getloadavg()[0]
    for _ in range(args.cli_repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        runs.append(time.perf_counter() - start)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"method": method, "samples": args.cli_samples, "threads": used, "seconds": median(runs), "runs": runs,
            "loadavg_1min": [load, os.getloadavg()[0]], "command": shlex.join(shown)}


def measure(args) -> dict:
    from report import environment

    with tempfile.TemporaryDirectory() as tmp:
        cli = [time_cli(method, threads, Path(tmp), args) for threads in args.cli_threads for method in args.cli_methods]
    return {"model": os.path.relpath(args.model, ROOT), "compress_cli": cli, "environment": environment()}


def render(runs: list[dict]) -> str:
    from report import markdown_table

    timed = [c for run in with_key(runs, "compress_cli") for c in run["compress_cli"]]
    text = markdown_table(["`hf-wsvd compress` (kept 0.5)", "samples", "threads", "load (1 min)", "wall time (s)",
                           "command"],
                          [[c["method"], c["samples"], c.get("threads", "default"), load_range(c.get("loadavg_1min", [])),
                            c["seconds"], f"`{c['command']}`"] for c in timed])
    for c in timed:
        if c["method"] == "fwsvd" and c["samples"] == 512:
            text += (f"\n\nTarget: fwsvd with 512 samples under {CLI_TARGET_SECONDS:g} s on a 2-core CPU "
                     f"({c.get('threads', 'default')} threads): {c['seconds']:.1f} s "
                     f"({verdict(c['seconds'] < CLI_TARGET_SECONDS)}).")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MINILM)
    parser.add_argument("--data", type=Path, default=SST2_TRAIN)
    parser.add_argument("--cli-samples", type=positive_int, default=512, help="Fisher samples of the timed CLI runs")
    parser.add_argument("--cli-methods", nargs="+", default=["fwsvd", "fisher_whiten"])
    parser.add_argument("--cli-repeats", type=positive_int, default=1)
    parser.add_argument("--cli-threads", nargs="+", default=["default"],
                        help="OMP_NUM_THREADS of the timed CLI runs (\"default\": unset)")
    add_json_arguments(parser)
    measure_or_publish("compress_time", parser.parse_args(argv), measure, render)


if __name__ == "__main__":
    main()
