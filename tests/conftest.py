import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tok():
    from moecl.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tiny_tok):
    """A BaseSpec over a tiny random Llama: every load() returns a fresh, identical copy."""
    from moecl.model.base import BaseSpec, state_dict_fingerprint
    from moecl.testing import tiny_llama

    sha = state_dict_fingerprint(tiny_llama(len(tiny_tok)))
    return BaseSpec("tiny-llama", sha, lambda: (tiny_llama(len(tiny_tok)), tiny_tok))


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
