"""CUDA graphs of the training step (cvae.graphs.StepGraphs), single runs and packs.

On a CPU the graph is ``_Rerun``: replaying calls the captured function again on the static
inputs and rewrites the same output tensors, so everything around a graph (static buffers
refilled each step, outputs used before the next replay, one graph per batch shape and
teacher-forcing mode, the eager warm-up, gradients handed to an eager optimizer, persistent
BatchNorm stacks in a pack, generation frame by frame) is checked against eager code. The
tests marked ``cuda`` (``pytest -m cuda`` on a GPU) replay real CUDA graphs.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

import cvae.graphs
import cvae.train
from cvae.graphs import StepGraphs
from cvae.model import VideoCVAE
from cvae.packed import PackedTrainer
from cvae.schedules import TeacherForcing
from cvae.train import (
    FitConfig,
    Hooks,
    cuda_graphs_wanted,
    new_fit_state,
    step_graphs,
    train_epoch,
)


class _Rerun:
    """``cvae.graphs._CudaGraph``'s stand-in without CUDA: ``replay`` calls ``fn`` on the
    static inputs again and copies the results into the same output tensors every time, as a
    graph's replay rewrites its outputs. So everything around a graph (static inputs refilled
    per call, outputs used before the next call, one graph per key, the eager first call, the
    optimizer outside) runs as it does on a GPU."""

    def __init__(self, fn: Callable[..., Any], key: Any, inputs: tuple[torch.Tensor, ...],
                 pool: Any):
        self.fn, self.key, self.inputs = fn, key, inputs
        self.outputs: Any = None

    def replay(self) -> Any:
        fresh = self.fn(self.key, *self.inputs)
        if self.outputs is None:
            self.outputs = fresh
        else:
            _copy_into(self.outputs, fresh)
        return self.outputs


def _copy_into(static: Any, fresh: Any) -> None:
    """Copy nested tuples of tensors (None allowed) into the same structure of tensors."""
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, (tuple, list)):
        for s, f in zip(static, fresh, strict=True):
            _copy_into(s, f)
    elif static is not None or fresh is not None:
        raise TypeError(f"cannot copy {type(fresh).__name__} into {type(static).__name__}")


DIMS = {"frame_dim": 8, "label_dim": 4, "latent_dim": 4, "decoder_dim": 8}
CLIPS, T, H, W = 5, 4, 8, 16  # batch 2: batches of 2, 2 and 1 (two graph shapes)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; float64 too


def _data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (CLIPS, T, 3, H, W), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 256, (CLIPS, T, 3, H, W), generator=g, dtype=torch.uint8)
    return clips.to(device), labels.to(device)


# Teacher forcing drawn per batch at 0.5: both graph keys (on and off) occur.
CONFIG = FitConfig(epochs=3, lr=2e-3, lr_schedule="constant", grad_clip=1.0,
                   teacher_forcing=TeacherForcing(ratio=0.5, mode="batch"))


def _state(seed, dtype, device="cpu", prior="learned", config=CONFIG):
    torch.manual_seed(100 + seed)
    model = VideoCVAE(**DIMS, prior=prior).to(device=device, dtype=dtype)
    return new_fit_state(model, config, seed=seed)


def _assert_same(a, b, rtol):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=rtol, atol=rtol), name
        else:
            assert torch.equal(x, y), name


def test_graphed_steps_train_exactly_like_eager_steps(float64):
    clips, labels = _data()
    eager, graphed = _state(0, float64), _state(0, float64)
    graphed.graphs = step_graphs(graphed.model, detach_prev=True, graph=_Rerun)
    for epoch in range(CONFIG.epochs):
        a = train_epoch(eager, clips, labels, CONFIG, Hooks())
        b = train_epoch(graphed, clips, labels, CONFIG, Hooks())
        assert a == b, epoch  # the same arithmetic on the same numbers, bit for bit
        eager.epoch = graphed.epoch = epoch + 1
    _assert_same(eager, graphed, rtol=0)
    keys = set(graphed.graphs.graphs)
    assert {key[0] for key in keys} == {2, 1}  # full batches and the last one of 1
    assert {key[-1] for key in keys} == {True, False}  # with and without teacher forcing
    assert graphed.graphs.warmed == keys and graphed.graphs.off is None


def test_a_graph_that_cannot_be_captured_turns_graphs_off(float64):
    """Out of GPU memory while capturing: graphs are given up with a warning and training
    goes on eagerly, unchanged."""
    class NoRoom:
        def __init__(self, *args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    clips, labels = _data()
    eager, graphed = _state(0, float64), _state(0, float64)
    graphed.graphs = step_graphs(graphed.model, detach_prev=True, graph=NoRoom)

    def train_both():
        for epoch in range(2):
            assert (train_epoch(eager, clips, labels, CONFIG, Hooks())
                    == train_epoch(graphed, clips, labels, CONFIG, Hooks()))
            eager.epoch = graphed.epoch = epoch + 1

    with pytest.warns(RuntimeWarning, match="CUDA graphs off.*capture failed"):
        train_both()
    assert not graphed.graphs.graphs and "out of memory" in graphed.graphs.off
    _assert_same(eager, graphed, rtol=0)


def test_a_warm_up_out_of_memory_frees_the_graphs_and_captures_again_later():
    """A new key's eager warm-up may not fit next to a big pack's graph (an epoch's last,
    smaller batch): the graphs go, their memory with them, the warm-up runs again, and the
    dropped key is captured again at its next call, without another warm-up."""
    calls = []

    def fn(key, x):
        calls.append(key)
        if key == "b" and calls.count("b") == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return x + 1

    graphs = StepGraphs(fn, graph=_Rerun)
    assert float(graphs("a", torch.tensor(1.0))) == 2.0  # warm-up
    assert float(graphs("a", torch.tensor(2.0))) == 3.0  # captured, replayed
    assert list(graphs.graphs) == ["a"]
    assert float(graphs("b", torch.tensor(5.0))) == 6.0  # out of memory, freed, run again
    assert calls == ["a", "a", "b", "b"] and not graphs.graphs and graphs.off is None
    assert float(graphs("a", torch.tensor(7.0))) == 8.0  # captured again, no warm-up
    assert float(graphs("b", torch.tensor(8.0))) == 9.0
    assert set(graphs.graphs) == {"a", "b"} and graphs.warmed == {"a", "b"}


def test_an_out_of_memory_with_no_graph_to_free_is_raised():
    def fn(key, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        StepGraphs(fn, graph=_Rerun)("a", torch.tensor(1.0))


def test_step_graphs_refill_their_inputs_every_call():
    seen = []

    def fn(key, x):
        seen.append(float(x))
        return x * 2

    graphs = StepGraphs(fn, graph=_Rerun)
    outputs = [float(graphs("k", torch.tensor(v))) for v in (1.0, 2.0, 3.0)]
    assert outputs == [2.0, 4.0, 6.0]
    assert seen == [1.0, 2.0, 3.0]
    assert list(graphs.graphs) == ["k"]  # warm-up eager, then captured at the second call


def test_graphs_only_on_cuda_and_when_asked():
    assert not cuda_graphs_wanted(CONFIG, torch.device("cpu"))
    assert cuda_graphs_wanted(CONFIG, torch.device("cuda"))
    assert not cuda_graphs_wanted(replace(CONFIG, cuda_graphs=False), torch.device("cuda"))
    state = _state(0, torch.float32)
    train_epoch(state, *_data(), CONFIG, Hooks())
    assert state.graphs is None  # a CPU run stays eager


def test_a_dropped_pack_frees_its_graphs_without_a_garbage_collection():
    """A pack's graphs hold its whole step's memory (~50 GB for 15 lab-size members on an
    H100): dropping the trainer must free them at once, so nothing may form a reference
    cycle with them (it did once: the graphs held a bound method of the trainer)."""
    import gc
    import weakref

    states = [_state(k, torch.float32) for k in range(2)]
    trainer = PackedTrainer(states, [CONFIG, CONFIG])
    trainer.graphs = StepGraphs(trainer._forward, graph=_Rerun)
    trainer.train_epoch(*_data())
    gone = weakref.ref(trainer.graphs)
    gc.disable()
    try:
        del trainer
        assert gone() is None
    finally:
        gc.enable()


def test_a_graphed_pack_trains_exactly_like_an_eager_pack(float64):
    clips, labels = _data()
    configs = [CONFIG, replace(CONFIG, lr=1e-3, teacher_forcing=TeacherForcing(ratio=0.0))]
    eager = PackedTrainer([_state(k, float64) for k in range(2)], configs)
    graphed = PackedTrainer([_state(k, float64) for k in range(2)], configs)
    assert graphed.graphs is None  # on a CPU; here the stand-in replays
    graphed.graphs = StepGraphs(graphed._forward, graph=_Rerun)
    for epoch in range(CONFIG.epochs):
        assert eager.train_epoch(clips, labels) == graphed.train_epoch(clips, labels), epoch
        for trainer in (eager, graphed):
            for state in trainer.states:
                state.epoch = epoch + 1
    for a, b in zip(eager.states, graphed.states):
        _assert_same(a, b, rtol=0)
    assert {key[-1] for key in graphed.graphs.graphs} >= {"mixed"}


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_real_cuda_graphs_match_eager_cuda_training(packed):
    """On a GPU: graphed training (the default on CUDA) against the same training eager,
    fp32; equal up to TF32/atomics run-to-run noise."""
    clips, labels = _data("cuda")
    configs = [CONFIG, replace(CONFIG, lr=1e-3)]
    eager_configs = [replace(c, cuda_graphs=False) for c in configs]
    losses = {}
    for name, cfgs in (("eager", eager_configs), ("graphed", configs)):
        states = [_state(k, torch.float32, "cuda", config=c) for k, c in enumerate(cfgs)]
        trainer = PackedTrainer(states, cfgs)
        assert (trainer.graphs is not None) == (name == "graphed")
        runs = []
        for epoch in range(CONFIG.epochs):
            if packed:
                metrics = trainer.train_epoch(clips, labels)
            else:
                metrics = [train_epoch(s, clips, labels, c, Hooks()) for s, c in zip(states, cfgs)]
            runs.append([m["train/loss"] for m in metrics])
            for state in states:
                state.epoch = epoch + 1
        losses[name] = runs
        if name == "graphed" and not packed:
            assert all(s.graphs is not None and s.graphs.graphs for s in states)
    graphed, eager = ([x for run in losses[name] for x in run] for name in ("graphed", "eager"))
    assert graphed == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize("latent,samples", [("prior_sample", 3), ("prior_mean", 1)])
def test_graphed_generation_is_eager_generation(monkeypatch, latent, samples):
    """Evaluation's closed-loop rollout, one graph replay per frame, draws the same noise in
    the same order and generates the same frames as eager (the stand-in graph here)."""
    monkeypatch.setattr(cvae.train, "graphable", lambda device: True)
    monkeypatch.setattr(cvae.graphs, "_CudaGraph", _Rerun)
    made = []
    real = cvae.train.StepGraphs

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cvae.train, "StepGraphs", Spy)
    state = _state(0, torch.float32)
    frames, labels = (x[0] for x in _data())  # (T, 3, H, W)
    runs = {}
    for graphs in (False, True):
        generator = torch.Generator().manual_seed(5)
        runs[graphs] = cvae.train.generate(state.model, frames[0], labels, latent=latent,
                                           samples=samples, generator=generator,
                                           cuda_graphs=graphs)
    assert torch.equal(runs[True], runs[False])
    assert len(made) == 1 and list(made[0].graphs) == [samples if latent == "prior_sample"
                                                       else 1]


@pytest.mark.cuda
def test_real_cuda_graphs_generate_what_eager_generates():
    state = _state(0, torch.float32, "cuda")
    frames, labels = (x[0] for x in _data("cuda"))
    runs = []
    for graphs in (False, True):
        generator = torch.Generator(device="cuda").manual_seed(5)
        runs.append(cvae.train.evaluate(state.model, frames, labels, samples=2,
                                        generator=generator, cuda_graphs=graphs))
    assert torch.allclose(runs[0].predictions, runs[1].predictions, atol=1e-4)
    assert runs[0].psnr == pytest.approx(runs[1].psnr, abs=1e-3)
