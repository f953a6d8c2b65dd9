"""Shared fixtures: a fresh Inductor cache per test, the fake process group, a real one-rank gloo
group; the vLLM tests in a process of their own when collected with the others."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._functorch.config
import torch.distributed as dist


@pytest.fixture(autouse=True)
def fresh_inductor_cache(tmp_path, monkeypatch):
    """A cache hit skips post-grad passes entirely, so every test compiles from scratch."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fake_pg(request):
    """A single-process 'world' of `request.param` ranks (default 2) whose collectives compute
    nothing: graphs only. Yields the world size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = getattr(request, "param", 2)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield world
    finally:
        dist.destroy_process_group()


@pytest.fixture
def world_of_one():
    """A real one-rank gloo group: collectives compile and run (and sum over one rank)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch raises on a custom op whose output aliases an input only when CI is set; raise
    # everywhere so a local run fails where CI would (spawned ranks inherit the variable).
    os.environ.setdefault("TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING", "1")
    torch._functorch.config.error_on_custom_op_aliasing = True


# ---- the vLLM tests in a process of their own ------------------------------------------------
# Other test modules define stand-ins for vLLM's ops (tests/vllm_standins.py); the real vLLM
# registers the same names on import, and the two cannot live in one process. When vLLM is
# installed and the adapter tests are collected with other tests (plain `pytest`), they run as
# one item that starts `pytest tests/test_vllm_adapter.py` in a fresh interpreter. Asked for
# alone, or without vLLM (its tests skip), they run here as usual.

VLLM_TESTS = Path(__file__).with_name("test_vllm_adapter.py")


def _asked_for_vllm_tests_only(config) -> bool:
    paths = {Path(str(arg).split("::", 1)[0]).resolve() for arg in config.args}
    return paths == {VLLM_TESTS}


def pytest_pycollect_makemodule(module_path, parent):
    if (
        Path(module_path) != VLLM_TESTS
        or importlib.util.find_spec("vllm") is None
        or _asked_for_vllm_tests_only(parent.config)
    ):
        return None
    return VllmTestsFile.from_parent(parent, path=Path(module_path))


class VllmTestsFile(pytest.File):
    def collect(self):
        yield VllmTestsInOwnProcess.from_parent(self, name="in_own_process")


class VllmTestsInOwnProcess(pytest.Item):
    def runtest(self):
        option = self.config.option
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(self.path)]
        if option.keyword:
            command += ["-k", option.keyword]
        if option.markexpr:
            command += ["-m", option.markexpr]
        run = subprocess.run(command, cwd=self.config.rootpath, capture_output=True, text=True)
        self.user_properties.append(("output", run.stdout[-2000:]))
        if run.returncode not in (0, 5):  # 5: -k / -m selected none of them
            raise VllmTestsFailed(run.returncode, run.stdout + run.stderr)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, VllmTestsFailed):
            code, output = excinfo.value.args
            return f"{VLLM_TESTS.name} in its own process exited {code}:\n{output[-8000:]}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{VLLM_TESTS.name} (in its own process)"


class VllmTestsFailed(Exception):
    pass
