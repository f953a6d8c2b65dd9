"""Token thresholds: when sequence parallelism (SP) pays, and how large the fused
AllReduce+RMSNorm kernel may go.

Both answers are pure functions of (hidden size, TP size, dtype, device), so every rank computes
the same number from the same facts and ranks never take divergent decisions. Each answer carries
a `reason` that names the device it was computed for, so a user who sees SP off can tell whether
the cause is the device, the model or the TP size.

    >>> sp_min_tokens(8192, 2, torch.bfloat16, DeviceInfo("cuda", (9, 0), "NVIDIA H100")).min_tokens
    1024

The default numbers are vLLM's measurements (SM90 and the SM100 family only). fxsp's policy where
vLLM has no measurement:

- hidden size below 8192 on a measured device: SP off by default (vLLM measured no gain); the
  caller may still pass `min_tokens=`.
- a CUDA device missing from the table (sm_80, sm_120, ...), ROCm, or another accelerator: SP off
  by default, and the reason says which device is missing; `min_tokens=` enables it.
- CPU: 0, SP at every size. Nothing was measured there and CPU runs are for correctness, where
  rewriting every graph is what we want.

docs/thresholds.md is `thresholds_markdown()`; the command that regenerates it is at its end.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

MiB = 1024 * 1024

# vLLM's tables, keyed by fxsp's name for a device family (see `_family`).
SP_MIN_HIDDEN_SIZE = 8192
SP_MIN_PER_GPU_MIB: dict[str, float] = {"sm90": 8, "sm100": 32}
ALLREDUCE_RMS_MAX_MIB: dict[str, dict[int, float]] = {
    "sm90": {2: 64, 4: 2, 8: 0.5},
    "sm100": {2: 64, 4: 32, 8: 1},
}
_FAMILY_NAMES = {"sm90": "SM90", "sm100": "the SM100 family"}


@dataclass(frozen=True)
class DeviceInfo:
    """The facts about a device that the thresholds depend on; plain data, so tests and docs can
    describe an H100 on a machine that has none.

    kind: "cuda", "rocm", "cpu", "xpu", ... (ROCm is its own kind: it reports CUDA-style
    capabilities such as (9, 0) for MI200 that must not be mistaken for SM90).
    """

    kind: str
    capability: tuple[int, int] | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """How messages name the device: 'sm_80 (NVIDIA A100-SXM4-80GB)', 'cpu'."""
        if self.kind == "cuda" and self.capability is not None:
            major, minor = self.capability
            text = f"sm_{major}{minor}"
        elif self.capability is not None:
            text = f"{self.kind} capability {self.capability[0]}.{self.capability[1]}"
        else:
            text = self.kind
        return f"{text} ({self.name})" if self.name else text


DeviceLike = DeviceInfo | torch.device | str | int | tuple | None


@dataclass(frozen=True)
class SPThreshold:
    """SP runs for batches of at least `min_tokens` rows; `min_tokens is None` means SP is off by
    default. `reason` says where the number came from, naming the device."""

    min_tokens: int | None
    reason: str

    def use_sp(self, tokens: int) -> bool:
        return self.min_tokens is not None and tokens >= self.min_tokens


@dataclass(frozen=True)
class FusionLimit:
    """The fused AllReduce+RMSNorm kernel serves batches of at most `max_tokens` rows;
    `max_tokens is None` means no fusion by default. `reason` names the device."""

    max_tokens: int | None
    reason: str

    def use_fusion(self, tokens: int) -> bool:
        return self.max_tokens is not None and tokens <= self.max_tokens


def device_info(device: DeviceLike = None) -> DeviceInfo:
    """Describe `device`: a DeviceInfo (returned as is), a CUDA capability tuple such as (9, 0),
    a torch.device, a string ("cuda:1", "cpu"), a CUDA index, or None for the current device
    (CUDA when available, else CPU). Only this function looks at the real hardware."""
    if isinstance(device, DeviceInfo):
        return device
    if isinstance(device, tuple):
        return DeviceInfo("cuda", (int(device[0]), int(device[1])))
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(device.type)
    capability = tuple(torch.cuda.get_device_capability(device))
    name = torch.cuda.get_device_name(device)
    kind = "rocm" if torch.version.hip else "cuda"
    return DeviceInfo(kind, capability, name)


def sp_min_tokens(
    hidden_size: int,
    tp_size: int,
    dtype: torch.dtype,
    device: DeviceLike = None,
    *,
    min_tokens: int | None = None,
) -> SPThreshold:
    """The smallest batch (rows) for which SP is worth its reduce-scatter and all-gather.

    `min_tokens=` overrides everything else. Otherwise, on SM90 and the SM100 family:
    `per_gpu_MiB * MiB * tp_size // (hidden_size * dtype bytes)` with 8 MiB on SM90 and 32 MiB on
    SM100, for hidden sizes of at least 8192. CPU gives 0. Everything else is off with a reason.
    """
    preset = _preset(
        SPThreshold, hidden_size, tp_size, "min_tokens", min_tokens, "SP has nothing to shard"
    )
    if preset is not None:
        return preset
    info = device_info(device)
    if info.kind == "cpu":
        return SPThreshold(0, "cpu: no measured SP threshold; fxsp applies SP at every size")
    family = _family(info)
    if family is None:
        return SPThreshold(None, f"no SP threshold for {info.label}; pass min_tokens= to enable SP")

    formula_tokens = _rows(SP_MIN_PER_GPU_MIB[family] * tp_size, hidden_size, dtype)
    formula = (
        f"{SP_MIN_PER_GPU_MIB[family]:g} MiB per GPU x tp {tp_size} "
        f"/ (hidden {hidden_size} x {dtype.itemsize} bytes)"
    )
    if hidden_size < SP_MIN_HIDDEN_SIZE:
        return SPThreshold(
            None,
            (
                f"hidden size {hidden_size} < {SP_MIN_HIDDEN_SIZE} on {info.label}: SP was "
                "measured not to pay below that; pass min_tokens= to enable SP (the "
                f"{_FAMILY_NAMES[family]} formula would give {formula_tokens})"
            ),
        )
    return SPThreshold(formula_tokens, f"{info.label}, {_FAMILY_NAMES[family]}: {formula}")


def allreduce_rms_max_tokens(
    hidden_size: int,
    tp_size: int,
    dtype: torch.dtype,
    device: DeviceLike = None,
    *,
    max_tokens: int | None = None,
) -> FusionLimit:
    """The largest batch (rows) the fused AllReduce+RMSNorm kernel should serve.

    `max_tokens=` overrides everything else (on CPU that is how the reference provider is used).
    Otherwise vLLM's size table (MiB of all-reduce input per rank) for SM90 {tp2: 64, tp4: 2,
    tp8: 0.5} and the SM100 family {tp2: 64, tp4: 32, tp8: 1}, divided by one row's bytes.
    This is only the size limit; whether fusion may run at all (pipeline size, FlashInfer
    installed) is decided by the caller.
    """
    preset = _preset(
        FusionLimit,
        hidden_size,
        tp_size,
        "max_tokens",
        max_tokens,
        "there is no all-reduce to fuse",
    )
    if preset is not None:
        return preset
    info = device_info(device)
    family = _family(info)
    if family is None:
        return FusionLimit(
            None,
            (
                f"no AllReduce+RMSNorm fusion size for {info.label} (the fused kernel is "
                "measured on SM90 and SM100 only); pass max_tokens= to enable it"
            ),
        )
    max_mib = ALLREDUCE_RMS_MAX_MIB[family].get(tp_size)
    if max_mib is None:
        return FusionLimit(
            None,
            (
                f"no AllReduce+RMSNorm fusion size for tp_size={tp_size} on {info.label} "
                f"(measured for tp {sorted(ALLREDUCE_RMS_MAX_MIB[family])}); "
                "pass max_tokens= to enable it"
            ),
        )
    return FusionLimit(
        _rows(max_mib, hidden_size, dtype),
        (
            f"{info.label}, {_FAMILY_NAMES[family]}: {max_mib:g} MiB at tp {tp_size} "
            f"/ (hidden {hidden_size} x {dtype.itemsize} bytes)"
        ),
    )


def thresholds_markdown() -> str:
    """The README fragment docs/thresholds.md, computed from the functions above."""
    devices = [
        ("SM90 (H100)", DeviceInfo("cuda", (9, 0), "H100")),
        ("SM100 (B200)", DeviceInfo("cuda", (10, 0), "B200")),
    ]
    hidden_sizes, tp_sizes = (4096, 8192, 16384), (2, 4, 8)

    def table(answer) -> list[str]:
        """Rows for bf16 by device and hidden size, a column per TP size; "off" where none."""
        lines = [
            "| device | hidden | " + " | ".join(f"TP {tp}" for tp in tp_sizes) + " |",
            "|---|---:|" + "---:|" * len(tp_sizes),
        ]
        for device_name, info in devices:
            for hidden in hidden_sizes:
                tokens = [astuple(answer(hidden, tp, torch.bfloat16, info))[0] for tp in tp_sizes]
                cells = ["off" if t is None else str(t) for t in tokens]
                lines.append(f"| {device_name} | {hidden} | " + " | ".join(cells) + " |")
        return lines

    lines = [
        "## Token thresholds",
        "",
        "Sequence parallelism trades one all-reduce for a reduce-scatter plus an all-gather, which",
        "only pays for large batches. fxsp uses SP for batches of at least `min_tokens` rows",
        "(`fxsp.policy.sp_min_tokens`), by default vLLM's measured table:",
        "`min_tokens = per_gpu_MiB * MiB * tp // (hidden * dtype_bytes)` with 8 MiB per GPU on",
        "SM90 and 32 MiB on the SM100 family, for hidden sizes of at least 8192.",
        "",
        "Minimum rows for SP, bf16:",
        "",
        *table(sp_min_tokens),
        "",
        '"off": SP is off by default (hidden size below 8192). Devices missing from the table',
        "(sm_80, sm_120, ROCm, ...) are off too, and the reason names the device. On CPU the",
        "threshold is 0 (SP at every size). An explicit `min_tokens=` always wins.",
        "",
        "Below the SP threshold, all-reduce + RMSNorm can run as one fused kernel up to a size",
        "limit (`fxsp.policy.allreduce_rms_max_tokens`): SM90 {TP 2: 64, TP 4: 2, TP 8: 0.5} MiB,",
        "SM100 family {TP 2: 64, TP 4: 32, TP 8: 1} MiB of all-reduce input per rank.",
        "",
        "Maximum rows for the fused AllReduce+RMSNorm kernel, bf16:",
        "",
        *table(allreduce_rms_max_tokens),
        "",
        "Regenerate this fragment with",
        (
            '`.venv/bin/python -c "from fxsp.policy.thresholds import thresholds_markdown as t; '
            "print(t(), end='')\" > docs/thresholds.md`."
        ),
        "",
    ]
    return "\n".join(lines)


def _family(info: DeviceInfo) -> str | None:
    """fxsp's table key for a device, or None when the device is not in the tables. Only CUDA:
    ROCm reports (9, 0) for gfx90a, which must not read as SM90."""
    if info.kind != "cuda" or info.capability is None:
        return None
    if info.capability == (9, 0):
        return "sm90"
    if info.capability[0] == 10:  # sm_100, sm_103, ...: one policy for the family, as in vLLM
        return "sm100"
    return None


def _rows(mib: float, hidden_size: int, dtype: torch.dtype) -> int:
    # Whole bytes first: 0.5 MiB is exact, and integer division then matches vLLM's floor.
    return int(mib * MiB) // (hidden_size * dtype.itemsize)


def _preset(
    answer: type, hidden_size: int, tp_size: int, option: str, value: int | None, single_rank: str
):
    """The answer before the device is asked: the caller's `option=value`, or none at TP 1.
    None when the device decides."""
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if value is not None:
        if value < 0:
            raise ValueError(f"{option} must be >= 0, got {value}")
        return answer(value, f"{option}={value} set by the caller")
    return answer(None, f"tp_size={tp_size}: {single_rank}") if tp_size < 2 else None
