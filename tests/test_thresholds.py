"""SP token thresholds and the AllReduce+RMSNorm fusion size limit: pure functions of the sizes,
the dtype and a device description, so every case runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxsp.policy import (
    DeviceInfo,
    allreduce_rms_max_tokens,
    device_info,
    sp_min_tokens,
    thresholds_markdown,
)

H100 = DeviceInfo("cuda", (9, 0), "NVIDIA H100 80GB HBM3")
B200 = DeviceInfo("cuda", (10, 0), "NVIDIA B200")
GB300 = DeviceInfo("cuda", (10, 3), "NVIDIA GB300")
A100 = DeviceInfo("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
GB10 = DeviceInfo("cuda", (12, 1), "NVIDIA GB10")
MI250 = DeviceInfo("rocm", (9, 0), "AMD Instinct MI250X")
CPU = DeviceInfo("cpu")


@pytest.mark.parametrize("tp, expected", [(2, 1024), (4, 2048), (8, 4096)])
def test_h100_hidden_8192_bf16_matches_vllm(tp, expected):
    threshold = sp_min_tokens(8192, tp, torch.bfloat16, H100)
    assert threshold.min_tokens == expected
    assert "sm_90" in threshold.reason


@pytest.mark.parametrize("device", [B200, GB300], ids=["sm100", "sm103"])
@pytest.mark.parametrize("tp, expected", [(2, 4096), (4, 8192), (8, 16384)])
def test_sm100_family_uses_32_mib_per_gpu(device, tp, expected):
    # 32 MiB * tp // (8192 * 2 bytes) = 2048 * tp, for every 10.x capability.
    assert sp_min_tokens(8192, tp, torch.bfloat16, device).min_tokens == expected


def test_dtype_and_hidden_size_enter_the_formula():
    assert sp_min_tokens(16384, 2, torch.bfloat16, H100).min_tokens == 512
    assert sp_min_tokens(8192, 2, torch.float32, H100).min_tokens == 512
    assert sp_min_tokens(8192, 2, torch.float8_e4m3fn, H100).min_tokens == 2048
    # Floor division, as in vLLM: 8 MiB * 2 / (12288 * 2) = 682.67
    assert sp_min_tokens(12288, 2, torch.bfloat16, H100).min_tokens == 682


def test_hidden_below_8192_is_off_by_default_and_says_why():
    threshold = sp_min_tokens(4096, 2, torch.bfloat16, H100)
    assert threshold.min_tokens is None
    assert not threshold.use_sp(10**6)
    assert "hidden size 4096 < 8192" in threshold.reason
    assert "sm_90 (NVIDIA H100 80GB HBM3)" in threshold.reason
    assert "min_tokens=" in threshold.reason
    assert "2048" in threshold.reason  # what the formula would have given


@pytest.mark.parametrize(
    "device, label",
    [
        (A100, "sm_80 (NVIDIA A100-SXM4-80GB)"),
        (GB10, "sm_121 (NVIDIA GB10)"),
        (DeviceInfo("cuda", (8, 9)), "sm_89"),
    ],
)
def test_cuda_device_missing_from_table_is_named_not_blamed_on_hidden_size(device, label):
    threshold = sp_min_tokens(8192, 4, torch.bfloat16, device)
    assert threshold.min_tokens is None
    assert threshold.reason == f"no SP threshold for {label}; pass min_tokens= to enable SP"
    assert "hidden" not in threshold.reason


def test_rocm_reporting_capability_9_0_is_not_taken_for_sm90():
    threshold = sp_min_tokens(8192, 2, torch.bfloat16, MI250)
    assert threshold.min_tokens is None
    assert "AMD Instinct MI250X" in threshold.reason


def test_cpu_threshold_is_zero_so_sp_runs_at_every_size():
    threshold = sp_min_tokens(64, 2, torch.float32, CPU)
    assert threshold.min_tokens == 0
    assert threshold.use_sp(1)
    assert threshold.reason.startswith("cpu")


def test_real_cpu_device_resolves_to_cpu():
    assert device_info("cpu") == CPU
    assert device_info(torch.device("cpu")) == CPU
    assert device_info((9, 0)) == DeviceInfo("cuda", (9, 0))
    assert sp_min_tokens(64, 2, torch.float32, "cpu").min_tokens == 0


@pytest.mark.parametrize("device", [H100, A100, CPU, MI250])
def test_override_wins_everywhere(device):
    threshold = sp_min_tokens(1024, 2, torch.bfloat16, device, min_tokens=77)
    assert threshold.min_tokens == 77
    assert "set by the caller" in threshold.reason
    assert sp_min_tokens(8192, 2, torch.bfloat16, device, min_tokens=0).min_tokens == 0


def test_tp_1_has_nothing_to_shard():
    assert sp_min_tokens(8192, 1, torch.bfloat16, H100).min_tokens is None
    assert sp_min_tokens(8192, 1, torch.bfloat16, CPU).min_tokens is None


def test_use_sp_is_inclusive_at_the_threshold():
    threshold = sp_min_tokens(8192, 2, torch.bfloat16, H100)
    assert not threshold.use_sp(1023)
    assert threshold.use_sp(1024)


@pytest.mark.parametrize(
    "call",
    [
        lambda: sp_min_tokens(0, 2, torch.bfloat16, H100),
        lambda: sp_min_tokens(8192, 0, torch.bfloat16, H100),
        lambda: sp_min_tokens(8192, 2, torch.bfloat16, H100, min_tokens=-1),
        lambda: allreduce_rms_max_tokens(8192, 2, torch.bfloat16, H100, max_tokens=-1),
    ],
)
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "device, tp, expected",
    [
        # MiB * MiB // (8192 * 2): 64 -> 4096, 2 -> 128, 0.5 -> 32, 32 -> 2048, 1 -> 64
        (H100, 2, 4096),
        (H100, 4, 128),
        (H100, 8, 32),
        (B200, 2, 4096),
        (B200, 4, 2048),
        (B200, 8, 64),
    ],
)
def test_allreduce_rms_fusion_size_table(device, tp, expected):
    limit = allreduce_rms_max_tokens(8192, tp, torch.bfloat16, device)
    assert limit.max_tokens == expected
    assert limit.use_fusion(expected) and not limit.use_fusion(expected + 1)


def test_allreduce_rms_fusion_off_elsewhere_with_the_device_named():
    a100 = allreduce_rms_max_tokens(8192, 2, torch.bfloat16, A100)
    assert a100.max_tokens is None and "sm_80 (NVIDIA A100-SXM4-80GB)" in a100.reason
    cpu = allreduce_rms_max_tokens(8192, 2, torch.bfloat16, CPU)
    assert cpu.max_tokens is None and "cpu" in cpu.reason and "max_tokens=" in cpu.reason
    tp3 = allreduce_rms_max_tokens(8192, 3, torch.bfloat16, H100)
    assert tp3.max_tokens is None and "tp_size=3" in tp3.reason and "sm_90" in tp3.reason
    assert allreduce_rms_max_tokens(8192, 1, torch.bfloat16, H100).max_tokens is None


def test_allreduce_rms_fusion_override_enables_the_reference_provider_on_cpu():
    limit = allreduce_rms_max_tokens(64, 2, torch.float32, CPU, max_tokens=512)
    assert limit.max_tokens == 512 and limit.use_fusion(512)


def test_docs_fragment_is_generated_from_the_functions():
    docs = Path(__file__).resolve().parents[1] / "docs" / "thresholds.md"
    assert docs.read_text() == thresholds_markdown(), "regenerate docs/thresholds.md (see file)"
    assert "| SM90 (H100) | 8192 | 1024 | 2048 | 4096 |" in docs.read_text()
