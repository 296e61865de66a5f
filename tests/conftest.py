"""Project-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run small networks and many tiny float64 ops. With two intra-op threads on a 2-core
    machine that other jobs share, OpenMP synchronisation costs far more than the ops (measured: the
    layer tests took 111 s with 2 threads and 13 s with 1). Each torchrun process likewise runs with
    OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
