"""HF causal LMs as users parallelise them: the model's own `base_model_tp_plan` applied with
DTensor's `parallelize_module` (what transformers' `tp_plan="auto"` does), for the tests and
`examples/hf_tp.py`. Needs `transformers` (a test dependency).

`tiny_model` makes a small random model of any architecture locally (no download); `plan_of`
reads a model's plan, or takes one for models that ship none; `parallelize` applies it.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

# Sizes of the tiny models: heads divisible by TP 2 and 3, rows of any count.
TINY = dict(
    hidden_size=48,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Plans for architectures that ship none, in the base model's names (as `base_model_tp_plan`).
PLANS = {
    "gptj": {
        "h.*.attn.q_proj": "colwise",
        "h.*.attn.k_proj": "colwise",
        "h.*.attn.v_proj": "colwise",
        "h.*.attn.out_proj": "rowwise",
        "h.*.mlp.fc_in": "colwise",
        "h.*.mlp.fc_out": "rowwise",
    },
    "nemotron": {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    },
}
# Attributes an attention module may view q, k, v with (GPT-J's `num_attention_heads`): each
# rank holds heads / tp of them.
HEAD_COUNTS = ("num_attention_heads", "num_heads", "num_key_value_heads")


def tiny_model(model_type: str, seed: int = 0, **config: Any) -> nn.Module:
    """A small random `AutoModelForCausalLM` of `model_type` in eval mode, the same on every
    rank; `config` overrides the tiny sizes (e.g. `use_parallel_residual=False`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **config})
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except ValueError:  # an architecture without SDPA attention
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def plan_of(model: nn.Module) -> dict[str, str]:
    """The model's TP plan, in its base model's module names."""
    plan = getattr(model.config, "base_model_tp_plan", None) or PLANS.get(model.config.model_type)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no base_model_tp_plan: pass a plan (module name pattern "
            "-> 'colwise' / 'rowwise')"
        )
    return dict(plan)


def parallelize(
    model: nn.Module, mesh: DeviceMesh, plan: dict[str, str] | None = None
) -> nn.Module:
    """`model` with `plan` (default: `plan_of(model)`) applied to its base model by
    `parallelize_module`: column-parallel in, row-parallel out, an all-reduce after each
    row-parallel matmul; the vocab-parallel embedding where the plan has one; and the model's
    own plan for its head (`_tp_plan`: a column-parallel LM head, its logits gathered)."""
    plan = plan_of(model) if plan is None else plan
    parallelize_module(model.base_model, mesh, {k: _style(v) for k, v in plan.items()})
    _localise_head_counts(model.base_model, plan, mesh.size())
    # The head's own plan (`lm_head: colwise_gather_output`), as transformers applies it too (a
    # head tied to a vocab-parallel embedding shards their one weight the same way).
    prefix = f"{model.base_model_prefix}."
    head = {
        k: _style(v)
        for k, v in (getattr(model, "_tp_plan", None) or {}).items()
        if not k.startswith(prefix)
    }
    if model is not model.base_model and head:
        parallelize_module(model, mesh, head)
    return model


def parallelize_sp_by_hand(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`model` (a Llama-family HF model: `model.layers.*.{self_attn,mlp}`, RMSNorms) with
    sequence parallelism written by hand, as torchtitan's plan does it: the baseline fxsp's
    automatic SP is measured against. Vocab-parallel embedding whose output is reduce-scattered
    to the sequence dim, `SequenceParallel` norms, `PrepareModuleInput` all-gathers before
    attention and MLP, row-parallel outputs reduce-scattered, the head's input all-gathered. The
    residual stream stays a DTensor sharded on the sequence dim: HF reads the sequence length off
    the embedding's output, which must be the global one."""
    rows, whole = Shard(1), Replicate()
    block = {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": rows},
            desired_input_kwarg_layouts={"hidden_states": whole},
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=rows, use_local_output=False),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(rows,), desired_input_layouts=(whole,)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=rows, use_local_output=False),
    }
    layers = len(model.base_model.layers)
    plan = {
        "embed_tokens": RowwiseParallel(
            input_layouts=whole, output_layouts=rows, use_local_output=False
        ),
        **{f"layers.{i}.{name}": style for i in range(layers) for name, style in block.items()},
        "norm": SequenceParallel(),
    }
    parallelize_module(model.base_model, mesh, plan)
    head = ColwiseParallel(input_layouts=rows, output_layouts=whole)
    parallelize_module(model, mesh, {"lm_head": head})
    return model


def _localise_head_counts(base: nn.Module, plan: dict[str, str], tp: int) -> None:
    """The modules holding column-parallel projections see heads / tp heads on each rank."""
    parents = {key.rsplit(".", 1)[0] for key, style in plan.items() if style == "colwise"}
    for name, module in base.named_modules():
        if any(fnmatch.fnmatch(name, pattern) for pattern in parents):
            for attr in HEAD_COUNTS:
                count = getattr(module, attr, None)
                if isinstance(count, int) and count % tp == 0:
                    setattr(module, attr, count // tp)


def _style(name: str):
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel()
    if name == "embedding_rowwise":  # vocab-parallel: each rank looks up its rows, then sums
        return RowwiseParallel(input_layouts=Replicate())
    if name in ("colwise_gather_output", "colwise_rep"):
        return ColwiseParallel(output_layouts=Replicate())
    raise ValueError(f"TP plan style {name!r} is not supported here (colwise, rowwise, ...)")
