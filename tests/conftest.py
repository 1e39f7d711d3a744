"""Fixtures shared by the test modules."""

import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))  # tests/_*.py helpers import as modules


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): reset them after a test."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms():
    """``Trainer(deterministic=True)`` turns ``torch.use_deterministic_algorithms`` on for the whole
    process and leaves it on; then every ``torch.empty`` fills its memory (NaN), and a later test that
    allocates large buffers (DeepSpeed's 500M-element gradient buckets) runs 30x slower."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine's other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
