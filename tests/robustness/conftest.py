"""Fixtures of the robustness tests: a tiny, quickly trained, deterministic classifier on synthetic data."""

from __future__ import annotations

import pytest
import torch

from tests.robustness.tiny import TinyTask, make_tiny_task


@pytest.fixture(scope="session")
def tiny_task() -> TinyTask:
    """A 4-class CNN on 1×8×8 synthetic images, trained to (near) 100% accuracy, plus a held-out batch."""
    return make_tiny_task()


@pytest.fixture(scope="package", autouse=True)
def _single_thread_torch():
    """One torch thread: these small batches gain nothing from more, and on the shared 2-core test machine two
    contended threads ran the attack tests many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
