"""Shared fixtures: a fresh Inductor cache per test, and the fake process group."""

from __future__ import annotations

import os

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


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch raises on a custom op whose output aliases an input only when CI is set; raise
    # everywhere so a local run fails where CI would (spawned ranks inherit the variable).
    os.environ.setdefault("TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING", "1")
    torch._functorch.config.error_on_custom_op_aliasing = True
