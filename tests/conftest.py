import os
import pytest
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("AVAR_IN_TEST", "1")
ROOT = Path(__file__).resolve().parents[1]

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier test (still run by CI)")


@pytest.fixture
def one_thread():
    "Tiny models: one torch thread is faster and avoids oversubscription on a 2-core runner (use with pytestmark)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
