#!/usr/bin/env bash
# fxsp's GPU checks in one call, for whoever has a CUDA machine (issue 14). About 6 minutes on
# an H200; each step has its own time limit, so the whole stays under 10 minutes.
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]       # default: $OUT, else gpu_check_out/
#
# Run from the repository root with the Python that has torch (CUDA) and Triton, e.g.
# PYTHON=.venv/bin/python. Steps, each writing its figures under OUTPUT_DIR:
#   1. tests/test_triton_kernels.py natively (the kernels against the references, on the GPU,
#      called as ops and as the launches fxsp's lowering splices in);
#   2. demo: the TP Llama compiled with fxsp, the Triton provider loaded, on a world of one
#      (NCCL), against eager, in fp32 and bf16: max |compiled - eager|, and that the norms were
#      lowered to the kernel's launch (Triton's kernel HOP, spliced in by fxsp's lowering) which
#      Inductor launches from its generated code, never calling the op;
#   3. benchmarks/norm_bandwidth.py: GPU time (CUDA graphs), host and back-to-back time, % of
#      copy bandwidth, for the four kernels, Inductor's and a copy;
#   4. benchmarks/sp_per_rank.py: one rank's step time and peak memory, SP against no SP, on the
#      fake process group (TP 2 and 8; the full grid with TP 4 takes longer: run it alone).
# summary.txt collects each step's result and its last lines.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD
unset TRITON_INTERPRET
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # fresh: fxsp reports on every compile
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, keep its output, note the result
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    {
        echo "== $name: exit $rc ($((SECONDS - start)) s; 124 = over its ${limit} s limit)"
        grep -v "^W[0-9]" "$OUT_DIR/$name.txt" | tail -n 12
        echo
    } >> "$SUMMARY"
}

{
    date -u
    git log --oneline -1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
    echo
} >> "$SUMMARY" 2>&1

step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py

step demo 90 "$PY" - <<'EOF'
"""The TP Llama compiled with fxsp (Triton provider loaded) on a world of one, against eager."""
import os

import torch
import torch.distributed as dist
from torch._inductor.utils import run_and_get_code

import fxsp
from fxsp.ir.kernels import load_gpu_providers
from fxsp.testing.tp_llama import Spec, TPLlama

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("nccl", rank=0, world_size=1)
print("providers:", load_gpu_providers())
worst, problems = {}, []
# Relative to max |eager|: fp32 and bf16 differ in the order of a norm's sum only; with FP8,
# such a difference may move a value one FP8 step (up to 1/16 of it) in one layer.
for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
    for fp8 in (False, True):
        tolerance = 0.15 if fp8 else tolerance
        torch._dynamo.reset()
        spec = Spec(layers=4, hidden=1024, heads=8, inter=2816, vocab=1024, dtype=dtype, fp8=fp8)
        model = TPLlama(spec).cuda()
        tokens = model.example_input(300).cuda()
        backend = fxsp.backend(None)
        with torch.no_grad():
            expected = model(tokens)
            actual, codes = run_and_get_code(torch.compile(model, backend=backend), tokens)
        code = "\n".join(codes)
        after = backend.reports[-1].after if backend.reports else ""
        error = (actual.float() - expected.float()).abs().max().item()
        scale = expected.float().abs().max().item()
        name = f"{dtype} fp8={fp8}"
        worst[name] = error / scale
        spliced = "triton_kernel_wrapper_functional" in after  # the launch, as fxsp left it
        launched = "_rms_norm_kernel" in code
        op_called = "torch.ops.fxsp_triton" in code
        print(f"{name}: max |compiled - eager| = {error:.3g} (of max |eager| {scale:.3g}); "
              f"lowered to the kernel launch: {spliced}; to the opaque op: "
              f"{'fxsp_triton.' in after}; kernel launched from Inductor's code: {launched}; "
              f"op called from Inductor's code: {op_called}")
        if error > tolerance * max(scale, 1.0):
            problems.append(f"{name}: compiled differs from eager")
        if not (spliced and launched and not op_called):
            problems.append(f"{name}: the norms are not Triton launches from Inductor's code")
dist.destroy_process_group()
assert not problems, problems
print("demo: compiled equals eager, every norm launched from Inductor's code", worst)
EOF

step norm_bandwidth 180 "$PY" benchmarks/norm_bandwidth.py --json "$OUT_DIR/norm_bandwidth.json"

step sp_per_rank 210 "$PY" benchmarks/sp_per_rank.py --tp 2 8 --json "$OUT_DIR/sp_per_rank.json"

cat "$SUMMARY"
