"""`import fxsp` stays light: Dynamo, Inductor and sympy load only when a compile needs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch._dynamo", "torch._inductor", "sympy")


def test_import_fxsp_leaves_dynamo_inductor_and_sympy_unloaded():
    code = (
        "import sys, torch; before = set(sys.modules); import fxsp, fxsp.ir, fxsp.compile.passes; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    ).stdout
    assert out.strip() == "[]", f"import fxsp loaded {out.strip()}"


def test_backend_registers_its_pass_with_inductor():
    """The pass is an Inductor CustomGraphPass (its uuid keys Inductor's cache) once a compile
    starts, without `import fxsp` importing Inductor."""
    code = (
        "import sys, fxsp; b = sys.modules['fxsp.compile.backend']; b._register_pass(); "
        "from torch._inductor.custom_graph_pass import CustomGraphPass; "
        "print(isinstance(b.FxspPass(fxsp.backend(None), None), CustomGraphPass))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    ).stdout
    assert out.strip() == "True"
