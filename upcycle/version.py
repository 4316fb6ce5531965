"""The package version: one place, imported by the CLI, the checkpoint writers and the adapters."""

__version__ = "0.1.0"
