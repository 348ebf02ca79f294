import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test networks and batches are tiny: one intra-op thread is fastest, and on a busy 2-core
    machine the spin-waits of a second one make tests several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
