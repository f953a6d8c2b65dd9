"""Inductor's realize-on-reuse decision on torch 2.11: a cost model instead of a read count.

When a pointwise or reduction value has several users (a residual stream, say), Inductor either
*realizes* it (computes it once into a buffer that every user reads) or *inlines* it (recomputes
it inside every user's kernel). Torch 2.11 decides by counting the value's input buffers
(`config.realize_reads_threshold`, 4), so a cheap value over a few large inputs is recomputed by
every user and its inputs are read once per user. The cost model here compares memory traffic:

    inline:  every user re-reads all inputs           total_read_bytes * users
    realize: read inputs once, write once, each user
             reads the result                         total_read_bytes + output_bytes * (1 + users)

and realizes when inline >= realize, i.e. `total_read_bytes * (users - 1) >= output_bytes *
(1 + users)`. Without size hints (unbacked sizes) it falls back to 2.11's read-count rule.

`install()` puts that rule into Inductor on torch 2.11.x only; elsewhere it patches nothing.
vLLM tried the same backport (and reverted it); fxsp's version differs in what it is written
against, all checked in torch 2.11.0's `torch/_inductor/ir.py`:

- the patched method is `StorageBox.should_realize_on_reuse(self, users)`, called from
  `StorageBox.mark_reuse` and from `GraphLowering.run_node` (graph.py);
- it asks the *inner* data (`Loops`: `Pointwise` / `Reduction`) for `has_large_inner_fn()`,
  `get_reads()`, `num_reads()`, `get_numel()` and `get_dtype()`; in 2.11 `StorageBox` forwards
  the first three through `MutableBox`, but going to the data says what is meant and does not
  depend on that forwarding;
- sizes come from `V.graph.get_dep_size_hint(dep)` and
  `V.graph.sizevars.optimization_hint(numel, fallback=0)`.

The fallback count is `data.num_reads()` (distinct buffers read), the number 2.11's own rule
compares with `realize_reads_threshold`; `len(data.get_reads())` counts (buffer, index) pairs and
would change the meaning of that threshold.

Disable with `install(enabled=False)` or `FXSP_INDUCTOR_REUSE=0` in the environment.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV_VAR = "FXSP_INDUCTOR_REUSE"
_METHOD = "should_realize_on_reuse"
_PATCH_MARK = "_fxsp_realize_on_reuse_patch"

_lock = threading.Lock()
# (patched class, the attribute exactly as it was in the class __dict__, or _ABSENT)
_saved: tuple[type, Any] | None = None
_ABSENT = object()


def should_realize(
    total_read_bytes: int,
    output_bytes: int,
    users: int,
    reads: int,
    reads_threshold: int,
) -> bool:
    """Whether a value with `users` consumers should be computed once into a buffer.

    With both sizes known (> 0): realize when re-reading the inputs in every user costs at least
    as much as writing the value once and reading it per user,
    `total_read_bytes * (users - 1) >= output_bytes * (1 + users)`. With a size unknown (0):
    torch 2.11's rule, realize when the value reads more than `reads_threshold` buffers.
    A single user never gains from a buffer.

        >>> should_realize(3000, 1000, users=2, reads=1, reads_threshold=4)
        True
    """
    if users <= 1:
        return False
    if total_read_bytes > 0 and output_bytes > 0:
        return total_read_bytes * (users - 1) >= output_bytes * (1 + users)
    return reads > reads_threshold


def install(enabled: bool | None = None) -> bool:
    """Patch Inductor's realize-on-reuse decision; True when this call finds or puts fxsp's
    decision in place.

    Only on torch 2.11.x (2.12 changed this code upstream): elsewhere nothing is patched and the
    answer is False. `enabled=False`, or `FXSP_INDUCTOR_REUSE=0` when `enabled` is None, patches
    nothing and answers False (an earlier install stays until `uninstall()`). Installing twice
    patches once; `uninstall()` restores the original.
    """
    global _saved
    if enabled is None:
        enabled = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")
    if not enabled:
        log.info("realize-on-reuse patch disabled (option or %s)", ENV_VAR)
        return False
    if not _torch_needs_patch(torch.__version__):
        log.debug("realize-on-reuse patch not needed on torch %s", torch.__version__)
        return False
    with _lock:
        target = _storage_box_class()
        current = getattr(target, _METHOD, None)
        if getattr(current, _PATCH_MARK, False):
            return True  # already ours, perhaps installed by an earlier copy of this module
        problem = _unexpected_shape(target)
        if problem:
            log.warning("realize-on-reuse patch not installed: %s", problem)
            return False
        _saved = (target, target.__dict__.get(_METHOD, _ABSENT))
        setattr(target, _METHOD, _make_patched_method(current))
        log.info("realize-on-reuse patch installed on %s.%s", target.__qualname__, _METHOD)
        return True


def uninstall() -> bool:
    """Restore the method `install()` replaced, exactly; True when something was restored."""
    global _saved
    with _lock:
        if _saved is None:
            return False
        target, original = _saved
        if original is _ABSENT:
            delattr(target, _METHOD)
        else:
            setattr(target, _METHOD, original)
        _saved = None
        return True


def is_installed() -> bool:
    """Whether the realize-on-reuse decision in use is fxsp's."""
    if not _torch_needs_patch(torch.__version__):
        return False
    return bool(getattr(getattr(_storage_box_class(), _METHOD, None), _PATCH_MARK, False))


def _torch_needs_patch(version: str) -> bool:
    """True for 2.11.x releases and their local builds ('2.11.0+cu128'), not for 2.12+."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match.group(1)), int(match.group(2))) == (2, 11)


def _storage_box_class() -> type:
    from torch._inductor.ir import StorageBox

    return StorageBox


def _unexpected_shape(target: type) -> str | None:
    """Why the 2.11 code this patch is written against is not what is loaded, or None."""
    import inspect

    from torch._inductor import config, ir

    method = getattr(target, _METHOD, None)
    if method is None:
        return f"{target.__qualname__} has no {_METHOD}"
    parameters = list(inspect.signature(method).parameters)
    if parameters != ["self", "users"]:
        # 2.12+ added keyword arguments that callers pass; a 2.11-shaped method would break them.
        return f"{target.__qualname__}.{_METHOD}{inspect.signature(method)} is not (self, users)"
    for name in ("has_large_inner_fn", "get_reads", "num_reads", "inner_fn_opcount", "get_numel"):
        if not callable(getattr(ir.Loops, name, None)):
            return f"torch._inductor.ir.Loops has no {name}()"
    if not hasattr(config, "realize_reads_threshold"):
        return "torch._inductor.config has no realize_reads_threshold"
    return None


def _make_patched_method(original: Callable[[Any, int], bool]) -> Callable[[Any, int], bool]:
    @functools.wraps(original)
    def should_realize_on_reuse(self: Any, users: int) -> bool:
        try:
            return _decide(self, users)
        except Exception:  # never fail a compile over a heuristic: use Inductor's own answer
            log.warning("realize-on-reuse cost model failed; using Inductor's rule", exc_info=True)
            return original(self, users)

    setattr(should_realize_on_reuse, _PATCH_MARK, True)
    return should_realize_on_reuse


# Ops whose results torch 2.11 realizes early on CPU regardless of traffic (kept as 2.11 has them).
_CPU_HEAVY_OPS = ("exp", "sigmoid")


def _decide(box: Any, users: int) -> bool:
    """The 2.11 decision with the cost model in place of the read count; `box` is a StorageBox,
    everything is asked of `box.data`."""
    from torch._inductor import config
    from torch._inductor.ir import Pointwise, Reduction, is_cpu
    from torch._inductor.virtualized import V

    data = box.data
    if users <= 1 or not isinstance(data, (Pointwise, Reduction)):
        return False
    if is_cpu(data):
        used_ops = data.inner_fn_opcount().used_ops
        if any(op in used_ops for op in _CPU_HEAVY_OPS):
            return True
    if data.has_large_inner_fn():
        return True
    total_read_bytes = sum(V.graph.get_dep_size_hint(dep) for dep in data.get_reads())
    numel = V.graph.sizevars.optimization_hint(data.get_numel(), fallback=0)
    output_bytes = int(numel) * data.get_dtype().itemsize
    return should_realize(
        total_read_bytes,
        output_bytes,
        users,
        reads=data.num_reads(),
        reads_threshold=config.realize_reads_threshold,
    )
