import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

# Tests never reach the Hub: with transformers' default hub kernels (the `kernels` package) a CUDA
# machine would fetch kernel code at load and train time, and offline fail there, not here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# Python subprocesses of the tests import this checkout's package too (pyproject's pytest
# ``pythonpath`` covers this process only), whatever is installed.
SRC = Path(__file__).resolve().parent.parent / "src"
os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])

import tiny  # noqa: E402

TESTS = Path(__file__).resolve().parent
# The project's assets beside the repository (HF_WSVD_SHARED: elsewhere); a clone alone lacks them.
SHARED = Path(os.environ.get("HF_WSVD_SHARED") or TESTS.parents[1] / "shared")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state, so what one test draws does not depend
    on which tests ran before it (a test that passed alone once failed after others)."""
    torch.manual_seed(0)


@pytest.fixture
def cpu_accelerator():
    """An accelerator on the CPU where the machine has an accelerator: accelerate's state is one per
    process, so the state an earlier test set up on the GPU is reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def shared() -> Path:
    """The ../shared assets folder (real models and GLUE data). Tests that need it skip, saying so,
    where it is absent (a fresh clone); HF_WSVD_REQUIRE_SHARED=1 (CI, which has it) makes that a
    failure instead, so that they cannot silently stop running there."""
    if not SHARED.is_dir():
        message = f"needs the shared assets folder {SHARED} (GLUE data, MiniLM models) beside the repository"
        if os.environ.get("HF_WSVD_REQUIRE_SHARED") == "1":
            pytest.fail(message + ": HF_WSVD_REQUIRE_SHARED=1 and it is missing")
        pytest.skip(message)
    return SHARED


@pytest.fixture
def logged():
    """The records transformers and datasets log at warning level and above during the test, as
    their own handlers receive them (they do not propagate to the root logger, so not to caplog)."""
    import datasets
    import transformers

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    libraries = [(transformers.logging, logging.getLogger("transformers")), (datasets.logging, logging.getLogger("datasets"))]
    levels = [library.get_verbosity() for library, _ in libraries]
    for library, log in libraries:
        library.set_verbosity_warning()
        log.addHandler(handler)
    yield records
    for (library, log), level in zip(libraries, levels):
        log.removeHandler(handler)
        library.set_verbosity(level)


@pytest.fixture
def tokenizer():
    return tiny.tokenizer()


@pytest.fixture
def classifier_dir(tmp_path, tokenizer):
    """A saved tiny dense BERT sequence classifier with its tokenizer."""
    path = tmp_path / "dense-classifier"
    tiny.build("bert", "AutoModelForSequenceClassification").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tsv(tmp_path):
    """A TSV of labelled sentences (``helpers.ROWS``)."""
    from helpers import ROWS

    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS))
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_results(tmp_path_factory, processes: int) -> list[dict]:
    """stats_worker.py run by torchrun in ``processes`` CPU processes: each process's results."""
    outdir = tmp_path_factory.mktemp(f"stats_{processes}proc")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(TESTS / "stats_worker.py"), str(outdir),
    ]
    proc = subprocess.run(command, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    results = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(processes)
               if (outdir / f"rank{r}.pt").exists()]
    details = [r.get("exception") for r in results if r.get("exception")]
    assert proc.returncode == 0, f"{details}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert len(results) == processes
    return results


@pytest.fixture(scope="session")
def two_process_results(tmp_path_factory):
    return _worker_results(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def one_process_result(tmp_path_factory):
    """What the two processes must equal: the same worker in one process, on the CPU like them (in
    the test's own process the pipeline would run on a GPU where there is one)."""
    return _worker_results(tmp_path_factory, 1)[0]
