"""Integrations of fxsp into other systems. Each adapter imports its host lazily, so
`import fxsp.adapters.<name>` works whether or not the host is installed."""
