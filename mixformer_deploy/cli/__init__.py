"""The `mixformer-deploy` command line: thin wrappers over the library."""

from .app import app, main

__all__ = ["app", "main"]
