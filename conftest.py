"""What every test file shares; pytest loads this file before any of them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton kernels in interpreter mode on CPU

import pytest  # noqa: E402 (after the environment above)
import torch  # noqa: E402

import cluster  # noqa: E402
import config  # noqa: E402
import trainer  # noqa: E402


@pytest.fixture(autouse=True)
def threads_follow_the_load():  # as a run's steps do (cluster.set_threads): fair to a busy machine
    cluster.set_threads(follow_load=True)


@pytest.fixture(scope="session")
def smollm2():
    return trainer.load_model(config.Config(), torch.device("cpu"))  # from_pretrained leaves it in eval mode
