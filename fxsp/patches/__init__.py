"""Fixes for particular torch versions, each off where its version does not need it:
`inductor_reuse.py` (torch 2.11's realize-on-reuse heuristic)."""
