"""The rule sets that replace all-reduce → (add +) norm: sequence parallelism (`rules.py`) for
large batches, the fused all-reduce + norm (`allreduce_norm.py`) for small ones; and what they
share: the site both rewrite (`site.py`), the row layout (`layout.py`, `rows.py`), which ops act
per row (`rowwise.py`) and MoE's chunk of a sharded value (`chunk.py`)."""
