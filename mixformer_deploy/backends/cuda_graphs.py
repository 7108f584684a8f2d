"""CUDA graph replay for static shapes: GPU latency that is not launch-bound. Used by the torch and
AOTInductor runners and by the GPU check."""

from __future__ import annotations

import torch


class CudaGraphed:
    """Replays ``fn`` from CUDA graphs, one per input shape (a graph replays one static shape): the input
    is copied into the graph's static buffer, the graph replayed, and its static output returned (valid
    until the next call). Capture follows PyTorch's recipe: a few warm-up calls on a side stream first.
    Used by the AOTInductor runner and by the GPU check for the eager deploy form."""

    def __init__(self, fn, device: torch.device, warmup: int = 3):
        self.fn, self.device, self.warmup = fn, device, warmup
        self.graphs: dict[tuple, tuple] = {}

    def _capture(self, x: torch.Tensor) -> tuple:
        static_x = x.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(static_x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = self.fn(static_x)
        return graph, static_x, static_y

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_x, static_y = self.graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y
