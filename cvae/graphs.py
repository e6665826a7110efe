"""CUDA graphs: a function of tensors captured once and replayed, one graph per key.

At the lab's size a training step (or a closed-loop frame step) is thousands of small kernels,
and launching them one by one from Python is what bounds a run on a GPU; a replay launches
them all at once. ``cvae.train`` (single runs: ``step_graphs``, ``generate``) and
``cvae.packed`` replay their steps through ``StepGraphs``.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch


class _CudaGraph:
    """``fn(key, *inputs)`` captured as one CUDA graph (in ``pool``, shared by the graphs of
    one ``StepGraphs``); ``replay`` reruns its kernels on the same memory and returns the same
    output tensors, refilled."""

    def __init__(self, fn: Callable[..., Any], key: Any, inputs: tuple[torch.Tensor, ...],
                 pool: Any):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(key, *inputs)

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """Runs ``fn(key, *inputs)`` (a training step's forward and backward: tensors in, tensors
    out) as CUDA graphs, one per ``key`` (what changes the kernels: batch shape, teacher
    forcing). At the lab's size a step is thousands of small kernels, and launching them one
    by one from Python is what bounds a run on a GPU; a replay launches them all at once.

    The first call with a key runs ``fn`` eagerly on a side stream (the warm-up CUDA graphs
    need: cuDNN plans, autograd's lazy state) and its result is that step's result; the
    second captures ``fn`` on static copies of the inputs, and every call from then on copies
    its inputs into them and replays. The graphs share one memory pool (they never run at
    once). Outputs are static tensors that the next replay of any of these graphs overwrites:
    use them before the next call.

    A warm-up that runs out of GPU memory while graphs hold theirs (a big pack meeting a new
    key, e.g. an epoch's last, smaller batch) drops the graphs, frees their memory and runs
    again; the dropped keys are captured again when they next come (already warmed, they need
    no second warm-up), sharing one new pool. If a capture fails, graphs are given up: every
    later call runs eagerly, with a warning, slower but not wrong. (An out-of-memory in the
    middle of a forward may have moved BatchNorm running statistics once more than eager
    training would.)
    """

    def __init__(self, fn: Callable[..., Any], *, graph: type | None = None):
        self.fn = fn
        self.graph_type = graph or _CudaGraph
        self.graphs: dict[Any, tuple[tuple[torch.Tensor, ...], Any]] = {}
        self.warmed: set[Any] = set()  # keys that ran their eager warm-up
        self.off: str | None = None  # why graphs were given up: every call eager
        self.pool: Any = None

    def __call__(self, key: Any, *inputs: torch.Tensor) -> Any:
        if self.off is None and key not in self.graphs:
            if key not in self.warmed:
                return self._warm_up(key, inputs)
            self._capture(key, inputs)
        if self.off is not None:
            return self.fn(key, *inputs)
        static, graph = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        return graph.replay()

    def _warm_up(self, key: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        def run():
            return self._side_stream(inputs[0].device, lambda: self.fn(key, *inputs))

        try:
            result = run()
        except torch.cuda.OutOfMemoryError:
            if not self.graphs:
                raise  # eager training would not fit either
            self._release()
            result = run()
        self.warmed.add(key)
        return result

    def _release(self) -> None:
        """Drop every graph and free its memory (the pool goes with the last graph)."""
        self.graphs.clear()
        self.pool = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _capture(self, key: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        static = tuple(value.clone() for value in inputs)
        try:
            if self.pool is None and self.graph_type is _CudaGraph:
                self.pool = torch.cuda.graph_pool_handle()
            self.graphs[key] = (static, self.graph_type(self.fn, key, static, self.pool))
        except RuntimeError as error:  # out of memory, or an operation a graph cannot hold
            self._give_up(f"capture failed ({type(error).__name__}: {error})")

    def _give_up(self, why: str) -> None:
        self._release()
        self.off = why.splitlines()[0][:300]
        warnings.warn(f"CUDA graphs off for this training: {self.off}; it goes on eagerly",
                      RuntimeWarning, stacklevel=3)

    @staticmethod
    def _side_stream(device: torch.device, work: Callable[[], Any]) -> Any:
        if device.type != "cuda":
            return work()
        main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                return work()
        finally:  # even after an error: nothing on the main stream may overtake that work
            main.wait_stream(side)


def graphable(device: torch.device) -> bool:
    """Whether CUDA graphs can run on ``device`` (CUDA only)."""
    return device.type == "cuda"
