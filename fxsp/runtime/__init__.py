"""What runs beside the compiled graphs: the rank-consistency guard (`guard.py`), the choice
between a graph's SP and non-SP variants per batch (`row_dispatch.py`), and the receiving side of
a pipeline-stage boundary (`pipeline.py`)."""

from .guard import RankMismatchError
from .pipeline import gather_rows

__all__ = ["RankMismatchError", "gather_rows"]
