"""The onnx backend: spec.py (light facts), export.py, runner.py."""
