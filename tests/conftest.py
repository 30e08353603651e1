"""Fixtures that more than one test module uses; plain helpers are in moecl/testing.py (no test module imports
from another)."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prefect reads its settings on first import: keep this session's Prefect files out of ~/.prefect.
if "prefect" not in sys.modules and not os.environ.get("PREFECT_HOME"):
    _home = tempfile.mkdtemp(prefix="moecl-prefect-home-")
    os.environ["PREFECT_HOME"] = _home
    atexit.register(shutil.rmtree, _home, True)


@pytest.fixture(scope="session")
def tiny_tok():
    from moecl.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tiny_tok):
    """A BaseSpec over a tiny random Llama: every load() returns a fresh, identical copy."""
    from moecl import testing

    return testing.tiny_base(tiny_tok)


@pytest.fixture
def fast_params():
    from moecl.config import Params

    p = Params()
    p.train.epochs = 2
    p.train.lr = 5e-3
    p.train.batch_size = 8
    p.train.max_length = 64
    p.train.evals_per_epoch = 1
    p.evaluate.max_new_tokens = 3
    return p


@pytest.fixture(scope="session")
def two_tasks():
    from moecl.testing import make_task

    return (
        make_task("topics", ["sports", "business", "science"]),
        make_task("sentiment", ["positive", "negative"], positive_label="positive"),
    )


# --- the reliability tests' workspaces (helpers: moecl/testing.py) ------------------------------------------------
# Module-scoped fixtures defined here are instantiated once per test module that uses them.
@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs use one torch thread: on two shared cores more threads only wait for each other. A module asks for it
    with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def champion_ws(request, tmp_path_factory, tiny_base):
    """A workspace whose champion v0001 knows `topics` (built once per module; each test works on a copy)."""
    from moecl.testing import TOPICS, land, make_task, run_library, workspace_params, write_params
    from tests import faults

    if any(name in item.name for item in request.session.items for name in ("sigkill", "concurrent")):
        faults.context()  # the fork server preloads in the background while the in-process tests run
    root = tmp_path_factory.mktemp("champion") / "ws"
    root.mkdir()
    params = workspace_params()
    write_params(root, params)
    land(root, make_task("topics", TOPICS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert [o.decision for o in run_library(params, tiny_base)] == ["promote"]
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def copy_workspace(tmp_path, monkeypatch):
    """copy_workspace(built): the test's own copy of a module-scoped built workspace, as the working directory."""

    def copy(built):
        root = tmp_path / "ws"
        shutil.copytree(built, root, symlinks=True)
        monkeypatch.chdir(root)
        return root

    return copy


@pytest.fixture
def ws(champion_ws, copy_workspace):
    return copy_workspace(champion_ws)


@pytest.fixture(scope="module")
def flow_server():
    """A Prefect API for flow runs: the session's test harness if tests/test_flows.py already started one
    (its fixture lives for the session), else one for this module."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL

    if PREFECT_API_URL.value() and "prefect-test.db" in str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()):
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
