"""fxsp inside torch.compile: the backend (`backend.py`), the passes every graph goes through
(`passes.py`), options and the configs built from them (`options.py`), what was done to each
graph (`report.py`, `stats.py`) and kept in Inductor's cache (`cache.py`), and async TP
(`async_tp.py`)."""
