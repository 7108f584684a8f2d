"""The executorch backend: spec.py (light facts), export.py, runner.py."""
