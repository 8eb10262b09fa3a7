from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports jax: digitjax sets its XLA flags then (they change the numerics
# slightly, so every test process must run with the same flags as `digitjax run`).
import digitjax  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CI checkout has the shared data sets next to the repo (see ../shared/data/README.md).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_data_env(tmp_path_factory) -> Path:
    """A fresh, empty TFDS data dir for the whole session, and no DIGITJAX_IDX_DIR* vars.

    So a dataset prepared by hand in ~/tensorflow_datasets cannot hide a broken prepare
    step, and the developer's own environment cannot change what the tests read.
    """
    data_dir = tmp_path_factory.mktemp("tfds_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(data_dir))
        # A developer's W&B login must not make tests log online.
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in list(os.environ):
            if var.startswith("DIGITJAX_IDX_DIR"):
                mp.delenv(var)
        yield data_dir


@pytest.fixture(scope="session")
def prepared_mnist(isolated_data_env) -> Path:
    """Real MNIST (embedded copy) prepared once per session in the session's TFDS_DATA_DIR.

    Returns the data dir; load_split("mnist", ...) with no data_dir finds it there.
    Takes ~16 s (TFDS prepare + first decode into the cache).
    """
    from digitjax import data

    data.prepare("mnist", progress=False)
    return isolated_data_env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (original IDX files); fails rather than skips when it is missing."""
    if not (SHARED_DATA / "fashion_mnist").is_dir():
        pytest.fail(
            f"{SHARED_DATA} is missing: the tests need the shared IDX data sets there "
            "(../shared/data relative to the repo root)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_idx():
    """Real MNIST from the embedded IDX files, decoded directly (fast; no TFDS):
    ((train images [60000, 28, 28, 1] uint8, labels), (test images, labels))."""
    from digitjax import data, idx

    d = data.EMBEDDED_MNIST_DIR
    x, y = idx.read_idx_pair(d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz")
    tx, ty = idx.read_idx_pair(d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz")
    return (x[..., None], y.astype("int32")), (tx[..., None], ty.astype("int32"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, mnist_idx):
    """A tiny real training run's folder, shared by the predict, Kaggle and plot tests."""
    from _tiny_run import tiny_run

    return tiny_run(tmp_path_factory, mnist_idx)


# -- fault tests (tests/test_faults.py, test_bad_input.py, test_checkpoint.py) ----------

def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="also run the fault soak: 20+ SIGKILLs at seeded random moments")
    parser.addoption("--fault-seed", type=int, default=20261127,
                     help="seed of the soak's random kill moments (replays a soak)")


@pytest.fixture(scope="session")
def soak(request) -> None:
    """Skips the test unless `pytest --soak`; ask for it first, before costly fixtures."""
    if not request.config.getoption("--soak"):
        pytest.skip("soak test: run with --soak")


@pytest.fixture(scope="session")
def fault_seed(request) -> int:
    """The seed the random kill moments are drawn from (printed in the summary)."""
    import _faults

    _faults.FAULT_SEED["seed"] = request.config.getoption("--fault-seed")
    return _faults.FAULT_SEED["seed"]


@pytest.fixture(scope="session")
def cli_env(prepared_mnist, tmp_path_factory) -> dict:
    """Environment of `digitjax` subprocesses: the session's data, a shared compile cache."""
    return {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist),
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


@pytest.fixture(scope="session")
def small_run_reference(cli_env, tmp_path_factory):
    """Final records of the uninterrupted SMALL run (tests/_faults.py), as a user runs it."""
    import _faults

    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = _faults.finish(_faults.start(workdir, cli_env))
    assert code == 0, err
    return _faults.final_records(_faults.run_dir_of(workdir))


@pytest.fixture
def fault_study(monkeypatch):
    """The test study of tests/_faults.py registered: a run that diverges, two that do not."""
    import _faults

    _faults.install_fault_study(monkeypatch.setattr)


@pytest.fixture(scope="session")
def fault_sweep(prepared_mnist, tmp_path_factory):
    """(workdir, echoed lines) of the uninterrupted sweep of the test study, in-process."""
    import _faults

    from digitjax import study

    workdir = tmp_path_factory.mktemp("fault_sweep")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        _faults.install_fault_study(mp.setattr)
        study.sweep(_faults.STUDY, workdir=workdir, echo=lines.append, progress=False,
                    plots=False, make_loggers=None, parallel="off")
    return workdir, lines


def pytest_terminal_summary(terminalreporter):
    import _faults

    lines = _faults.summary_lines()
    if lines:
        terminalreporter.section("fault suite")
        for line in lines:
            terminalreporter.write_line(line)
