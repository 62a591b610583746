"""Shared fixture of the CPU-kernel tests: the compiled extension (the test files themselves
skip where the kernels cannot be used here)."""

import pytest

from llmpress.runtime import cpu_kernels


@pytest.fixture(scope="session")
def ext():
    mod = cpu_kernels.kernels()
    assert mod is not None, f"the kernels did not build: {cpu_kernels._state.get('reason')}"
    return mod
