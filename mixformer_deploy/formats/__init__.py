"""Readers of artifact formats that both a target (writer) and a runtime (runner) use, so that runners
never import exporters."""
