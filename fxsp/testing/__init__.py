"""Models and helpers for testing and demonstrating fxsp (not needed to use it)."""
