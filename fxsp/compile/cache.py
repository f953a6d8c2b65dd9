"""What fxsp keeps in Inductor's cache: the one cache key of its passes, and the reports of
the graphs they rewrote.

An Inductor (or AOT autograd) cache hit skips the post-grad passes, so fxsp saves each compile's
reports as plain JSON beside Inductor's cache, `<cache dir>/fxsp_reports/<key>.json`, and reads
them back on a hit. Never pickle: cache dirs are shared between ranks, jobs and users, and loading
a pickle runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .report import GraphReport

log = logging.getLogger("fxsp")


def cache_key(*parts: Any) -> str:
    """The cache key (`uuid()`) of an fxsp pass: fxsp's source (which holds its version), and
    `parts` (the options, the TP group and rank: whatever else decides the rewrite)."""
    return hashlib.sha256(repr((source_digest(), parts)).encode()).hexdigest()


_REPORTS_FORMAT = 1


def report_key(pass_key: str, gm: torch.fx.GraphModule, example_inputs: list) -> str:
    """What decides the graphs compile_fx hands the pass: the pass itself (fxsp's source, the
    options, TP group, rank, SP variant), the Dynamo graph with its literals, the inputs, grad
    mode and the compiler's versions and settings."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    code = [line for line in gm.code.splitlines() if not line.lstrip().startswith("#")]
    constants = [
        (n.target, _input_meta(_attribute(gm, n.target)))
        for n in gm.graph.find_nodes(op="get_attr")
    ]
    parts = (
        _REPORTS_FORMAT,
        pass_key,
        torch.__version__,
        code,
        constants,
        [_input_meta(a) for a in example_inputs],
        torch.is_grad_enabled(),
        inductor_config.get_hash().hex(),
        functorch_config.get_hash().hex(),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _input_meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (
            str(a.dtype),
            tuple(map(str, a.shape)),
            tuple(map(str, a.stride())),
            a.device.type,
            a.requires_grad,
        )
    return (
        str(a)
        if isinstance(a, (torch.SymInt, torch.SymFloat, int, float, bool))
        else type(a).__name__
    )


def _attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def reports_path(key: str) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fxsp_reports" / f"{key}.json"


def save_reports(key: str, reports: dict) -> None:
    """Plain JSON, written whole then renamed: ranks and jobs share the cache dir."""
    path = reports_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": _REPORTS_FORMAT,
        **{when: [r.to_json() for r in rs] for when, rs in reports.items()},
    }
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def load_reports(key: str) -> dict[str, list[GraphReport]] | None:
    """The reports saved under `key` ("compile" and "later"), marked cached; None when there
    are none to read."""
    path = reports_path(key)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _REPORTS_FORMAT:
            return None
        return {
            when: [GraphReport.from_json(r) for r in data[when]] for when in ("compile", "later")
        }
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable: as if missing
        log.debug("fxsp: ignoring the unreadable report file %s: %s", path, e)
        return None


_digest: str | None = None


def source_digest() -> str:
    """Hash of fxsp's own source: a changed rule must never hit a stale cache entry."""
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).parents[1].rglob("*.py")):
            h.update(path.read_bytes())
        _digest = h.hexdigest()
    return _digest
