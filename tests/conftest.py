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


# ---- torch 2.11: real worlds at TP 3 only ----------------------------------------------------
# The suite runs on torch 2.13 and again on 2.11 (README, .ci/run). Where a test runs a real gloo
# world at TP 2 and, otherwise alike, at TP 3, torch 2.11 runs the TP 3 one only (uneven shards,
# the harder): the TP 2 one repeats fxsp's code on the same torch, and CI's time is bounded.

WORLD_PARAMS = ("world", "world_size")


def pytest_collection_modifyitems(config, items):
    if torch.__version__ >= "2.13":
        return
    at_tp3 = {_without_world(item) for item in items if _world(item) == 3}
    for item in items:
        if _world(item) == 2 and _without_world(item) in at_tp3:
            item.add_marker(
                pytest.mark.skip(
                    reason="torch 2.11 runs this real gloo world at TP 3 only; TP 2 runs on "
                    "torch 2.13 (CI's time)"
                )
            )


def _world(item) -> int | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return next((params[name] for name in WORLD_PARAMS if name in params), None)


def _without_world(item) -> tuple:
    params = getattr(getattr(item, "callspec", None), "params", {})
    rest = sorted((k, repr(v)) for k, v in params.items() if k not in WORLD_PARAMS)
    return (item.path, item.originalname, tuple(rest))


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
