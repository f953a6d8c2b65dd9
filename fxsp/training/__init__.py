"""Sequence parallelism for training: rewrites of Dynamo's graph before AOT autograd derives
the backward (docs/training.md)."""
