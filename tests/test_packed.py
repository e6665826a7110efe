"""Packed members against the same members trained alone with cvae.train (tiny dims, CPU).

Two precisions, for two different claims:
- float64: the packed computation IS the single-run computation, step for step (parameters,
  BatchNorm statistics, optimizer state, RNG streams, losses agree to ~1e-10);
- float32 (what runs): losses agree within 1e-4 relative. Parameters agree only as well as
  fp32 Adam allows *any* change of kernel: Adam moves every weight by about +-lr whatever
  the size of its gradient, so a weight whose gradient is a near-cancelling sum gets a step
  of either sign from rounding noise. The single run itself, NCHW vs channels_last, differs
  by up to ~1e-3 (relative norm per tensor) after 20 steps at these dims, so that is the bound.
"""

from dataclasses import dataclass, replace

import pytest
import torch

import cvae.packed
import cvae.train
from cvae.data import DatasetError
from cvae.model import VideoCVAE
from cvae.packed import (
    PackedNonFiniteLossError,
    PackedTrainer,
    fit_packed,
    packable,
    packing_problems,
)
from cvae.schedules import ConstantKL, CyclicalKL, MonotonicKL, TeacherForcing
from cvae.train import FitConfig, Hooks, fit, new_fit_state, train_epoch

DIMS = {"frame_dim": 8, "label_dim": 4, "latent_dim": 4, "decoder_dim": 8}
CLIPS, T, H, W = 10, 4, 8, 16  # 10 clips / batch 2 = 5 steps per epoch
EPOCHS = 4  # 20 optimizer steps
# A conv bias feeding BatchNorm: BN removes its effect, its true gradient is 0, so Adam turns
# pure rounding noise into +-lr steps in any implementation; the BN running mean carries that
# bias along. Both are checked against that bound only.
PRE_BATCHNORM_BIAS = "label_encoder.1.bias"
NOISE_DRIVEN = (PRE_BATCHNORM_BIAS, "label_encoder.2.running_mean")


@dataclass(frozen=True)
class Member:
    seed: int
    optimizer: str
    weight_decay: float
    activation: str
    config: FitConfig


# Three arms that differ in everything packing allows to differ.
MEMBERS = [
    Member(seed=0, optimizer="adam", weight_decay=0.0, activation="sigmoid",
           config=FitConfig(epochs=EPOCHS, lr=1e-3, lr_schedule="multistep", lr_milestones=(2,),
                            kl=CyclicalKL(cycles=2, ratio=0.5),
                            teacher_forcing=TeacherForcing(ratio=1.0, decay_start=1,
                                                           decay_step=0.4),
                            grad_clip=1.0)),
    Member(seed=1, optimizer="adamw", weight_decay=0.01, activation="identity",
           config=FitConfig(epochs=EPOCHS, lr=3e-4, lr_schedule="cosine",
                            kl=MonotonicKL(ratio=0.5, per="iteration"),
                            teacher_forcing=TeacherForcing(ratio=0.0), grad_clip=0.05)),
    Member(seed=2, optimizer="adam", weight_decay=0.0, activation="sigmoid",
           config=FitConfig(epochs=EPOCHS, lr=2e-3, lr_schedule="constant",
                            kl=ConstantKL(value=0.5),
                            teacher_forcing=TeacherForcing(ratio=0.5, mode="batch"),
                            grad_clip=None)),
]
MAX_LR = max(m.config.lr for m in MEMBERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; float64 too


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 256, (CLIPS, T, 3, H, W), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 256, (CLIPS, T, 3, H, W), generator=g, dtype=torch.uint8)
    val = torch.randint(0, 256, (2, 12, 3, H, W), generator=g, dtype=torch.uint8)
    return clips, labels, val[0], val[1]


def _states(members=MEMBERS, *, prior="standard_normal", detach_prev=True,
            dtype=torch.float32, memory_format=torch.contiguous_format):
    """Fresh models (own init seeds) and fit states, built the way the runner builds them."""
    states, configs = [], []
    for m in members:
        torch.manual_seed(1000 + m.seed)
        model = VideoCVAE(**DIMS, output_activation=m.activation, prior=prior)
        model = model.to(dtype=dtype, memory_format=memory_format)
        config = replace(m.config, detach_prev=detach_prev)
        states.append(new_fit_state(model, config, seed=m.seed, optimizer=m.optimizer,
                                    weight_decay=m.weight_decay))
        configs.append(config)
    return states, configs


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _assert_same_state(alone, packed, *, rtol: float, steps: int = 2 * EPOCHS * 5):
    packed_state = packed.model.state_dict()
    for name, a in alone.model.state_dict().items():
        b = packed_state[name]
        if name in NOISE_DRIVEN:
            assert (a - b).abs().max() <= 2 * MAX_LR * steps, name
        elif a.is_floating_point():
            assert _relative_error(a, b) <= rtol, f"{name}: {_relative_error(a, b):.2e}"
        else:
            assert torch.equal(a, b), name  # num_batches_tracked
    if rtol <= 1e-6:  # the optimizer state is as comparable as the parameters it came from
        opt_a, opt_b = alone.optimizer.state_dict(), packed.optimizer.state_dict()
        assert opt_a["param_groups"] == opt_b["param_groups"]
        names = [n for n, _ in alone.model.named_parameters()]
        for index, state_a in opt_a["state"].items():
            if names[index] == PRE_BATCHNORM_BIAS:
                continue
            for key, value in state_a.items():
                assert _relative_error(value, opt_b["state"][index][key]) <= rtol, key
    assert torch.equal(alone.data_generator.get_state(), packed.data_generator.get_state())
    assert torch.equal(alone.noise_generator.get_state(), packed.noise_generator.get_state())


def _train_both(*, dtype, prior="standard_normal", detach_prev=True, loss_rtol,
                memory_format=torch.contiguous_format, epochs=EPOCHS, convolutions="grouped"):
    clips, labels, _, _ = _data()
    alone, configs = _states(prior=prior, detach_prev=detach_prev, dtype=dtype)
    together, _ = _states(prior=prior, detach_prev=detach_prev, dtype=dtype,
                          memory_format=memory_format)
    trainer = PackedTrainer(together, configs, convolutions=convolutions)
    for epoch in range(epochs):
        packed_metrics = trainer.train_epoch(clips, labels)
        for k, (state, config) in enumerate(zip(alone, configs)):
            metrics = train_epoch(state, clips, labels, config, Hooks())
            assert packed_metrics[k].keys() == metrics.keys()
            for key, value in metrics.items():
                assert packed_metrics[k][key] == pytest.approx(value, rel=loss_rtol, abs=1e-12), (
                    f"epoch {epoch} member {k} {key}")
            state.epoch = together[k].epoch = epoch + 1
    return alone, trainer.unpack()


@pytest.mark.parametrize("prior,detach_prev,epochs", [("standard_normal", True, EPOCHS),
                                                    ("learned", False, 2)])
def test_packed_is_the_single_run_computation_in_float64(float64, prior, detach_prev, epochs):
    alone, together = _train_both(dtype=float64, prior=prior, detach_prev=detach_prev,
                                  loss_rtol=1e-10, epochs=epochs)
    for a, b in zip(alone, together):
        _assert_same_state(a, b, rtol=1e-9)


def test_packed_matches_training_alone_in_float32():
    alone, together = _train_both(dtype=torch.float32, loss_rtol=1e-4)
    for a, b in zip(alone, together):
        _assert_same_state(a, b, rtol=1e-2)


def test_channels_last_members_pack(float64):
    alone, together = _train_both(dtype=float64, loss_rtol=1e-10,
                                  memory_format=torch.channels_last, epochs=1)
    for a, b in zip(alone, together):
        _assert_same_state(a, b, rtol=1e-9)


@pytest.mark.parametrize("convolutions", ["matmul_1x1", "matmul"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_packed_convolutions_as_matrix_products(float64, convolutions, memory_format):
    """The GEMM forms of the members' convolutions (for devices where vmap's grouped
    convolutions are slow) are the same computation: float64 agreement with training alone,
    learned prior included (its head has 1x1 and 3x3 convolutions too)."""
    shell = cvae.packed._MemberRollout(VideoCVAE(**DIMS), convolutions)
    kinds = {type(m).__name__ for m in shell.modules()}
    assert "_PointwiseConv2d" in kinds
    assert ("_UnfoldConv2d" in kinds) == (convolutions == "matmul")
    alone, together = _train_both(dtype=float64, prior="learned", loss_rtol=1e-10, epochs=1,
                                  memory_format=memory_format, convolutions=convolutions)
    for a, b in zip(alone, together):
        _assert_same_state(a, b, rtol=1e-9, steps=5)


def test_unknown_packed_convolutions_is_refused():
    states, configs = _states()
    with pytest.raises(ValueError, match="choose one of"):
        PackedTrainer(states, configs, convolutions="winograd")


def test_auto_convolutions_follow_the_device():
    """auto: batched GEMMs for 1x1 convolutions on CUDA (faster on an H100), vmap's grouped
    convolutions on a CPU (faster there); a pack on the CPU resolves to grouped."""
    assert cvae.packed.resolve_convolutions("auto", torch.device("cuda")) == "matmul_1x1"
    assert cvae.packed.resolve_convolutions("auto", torch.device("cpu")) == "grouped"
    assert cvae.packed.resolve_convolutions("matmul", torch.device("cpu")) == "matmul"
    assert PackedTrainer(*_states()).convolutions == "grouped"


def test_fit_packed_matches_fit(float64):
    clips, labels, val_frames, val_labels = _data(1)
    members = [replace(m, config=replace(m.config, epochs=2, eval_every=1)) for m in MEMBERS]
    alone, configs = _states(members, dtype=float64)
    together, _ = _states(members, dtype=float64)

    class Record(Hooks):
        def __init__(self):
            self.logged, self.batches = [], 0

        def log_metrics(self, metrics, step):
            self.logged.append((step, dict(metrics)))

        def on_batch(self, epoch, index, total):
            self.batches += 1

    hooks_alone = [Record() for _ in alone]
    for state, config, hook in zip(alone, configs, hooks_alone):
        fit(state, clips, labels, val_frames, val_labels, config, hooks=hook)
    hooks_packed = [Record() for _ in together]
    fit_packed(PackedTrainer(together, configs), clips, labels, val_frames, val_labels,
               hooks=hooks_packed)
    for a, b, ha, hb in zip(alone, together, hooks_alone, hooks_packed):
        assert b.epoch == a.epoch == 2 and b.best_epoch == a.best_epoch
        assert hb.batches == ha.batches == 10
        assert [s for s, _ in hb.logged] == [s for s, _ in ha.logged] == [0, 1]
        for (_, ma), (_, mb) in zip(ha.logged, hb.logged):
            assert mb.keys() == ma.keys() and {"val/psnr", "val/psnr_prior_mean"} <= set(mb)
            for key in ma:
                assert mb[key] == pytest.approx(ma[key], rel=1e-9), key
        _assert_same_state(a, b, rtol=1e-9, steps=10)


def test_a_diverging_member_stops_alone(float64):
    clips, labels, val_frames, val_labels = _data(3)
    members = [replace(m, config=replace(m.config, epochs=2)) for m in MEMBERS]
    alone, configs = _states(members, dtype=float64)
    together, _ = _states(members, dtype=float64)
    with torch.no_grad():
        together[1].model.generator[-1].weight.fill_(float("nan"))
    logged = [[] for _ in together]

    class Record(Hooks):
        def __init__(self, sink):
            self.sink = sink

        def log_metrics(self, metrics, step):
            self.sink.append(step)

    with pytest.raises(PackedNonFiniteLossError) as error:
        fit_packed(PackedTrainer(together, configs), clips, labels, val_frames, val_labels,
                   hooks=[Record(sink) for sink in logged])
    assert error.value.members == [1]
    assert together[1].epoch == 0 and logged[1] == []
    for k in (0, 2):  # the others trained on, exactly as alone
        fit(alone[k], clips, labels, val_frames, val_labels, configs[k])
        assert together[k].epoch == 2 and logged[k] == [0, 1]
        _assert_same_state(alone[k], together[k], rtol=1e-9, steps=10)


def test_a_pack_whose_batch_exceeds_the_clips_stops_before_training():
    clips, labels, val_frames, val_labels = _data(0)
    members = [replace(m, config=replace(m.config, batch_size=CLIPS + 1)) for m in MEMBERS]
    states, configs = _states(members)
    with pytest.raises(DatasetError, match=f"batch size {CLIPS + 1} is larger than the "
                                           f"{CLIPS} training clips"):
        fit_packed(PackedTrainer(states, configs), clips, labels, val_frames, val_labels)
    assert all(state.epoch == 0 for state in states)


def test_packable_reports_what_differs():
    states, configs = _states()
    assert packable(states, configs)
    odd = new_fit_state(VideoCVAE(**{**DIMS, "latent_dim": 8}), configs[0], seed=3)
    assert not packable([states[0], odd], configs[:2])
    assert any("architecture" in p for p in packing_problems([states[0], odd], configs[:2]))
    other_batch = [configs[0], replace(configs[1], batch_size=4)]
    assert any("batch_size" in p for p in packing_problems(states[:2], other_batch))
    with pytest.raises(ValueError, match="cannot be packed"):
        PackedTrainer(states[:2], other_batch)
    other_precision = [configs[0], replace(configs[1], precision="bf16")]
    assert any("precision" in p for p in packing_problems(states[:2], other_precision))


def test_bf16_members_pack_like_bf16_single_runs():
    """precision="bf16" packs too: the packed forward runs under the same bf16 autocast as a
    single run, so each member's epoch loss is its single run's within bf16 rounding."""
    states, configs = _states()
    configs = [replace(c, precision="bf16") for c in configs]
    alone_states, _ = _states()
    clips, labels, _, _ = _data()
    alone = [train_epoch(s, clips, labels, c, Hooks()) for s, c in zip(alone_states, configs)]
    packed = PackedTrainer(states, configs)
    assert packed.autocast_dtype is torch.bfloat16
    together = packed.train_epoch(clips, labels)
    for a, b in zip(alone, together):
        assert abs(a["train/loss"] - b["train/loss"]) <= 2e-2 * abs(a["train/loss"]), (a, b)
    for state in states:  # parameters and their optimizer stay fp32
        assert all(p.dtype == torch.float32 for p in state.model.parameters())


def test_packed_batch_norm_bypasses_cudnn(monkeypatch):
    """On CUDA, torch's batch-norm entry asks a vmapped tensor for its memory format before it
    picks cuDNN, which vmap cannot answer (seen on an H100: "NYI: querying is_contiguous
    inside of vmap"). The packed shell's BatchNorm therefore runs with cuDNN off, and the
    flag is restored after each call. Checked here through the flag F.batch_norm reads."""
    import torch.nn.functional as F

    seen = []
    real_batch_norm = F.batch_norm

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.enabled)
        return real_batch_norm(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", spy)
    assert torch.backends.cudnn.enabled
    states, configs = _states(memory_format=torch.channels_last)
    clips, labels, _, _ = _data()
    PackedTrainer(states, configs).train_epoch(clips, labels)
    assert seen and not any(seen)  # the label encoder's BatchNorm, every batch, cuDNN off
    assert torch.backends.cudnn.enabled


@pytest.mark.parametrize("cudnn_tf32", [True, False])
def test_matmuls_follow_the_convolutions_precision_on_cuda(monkeypatch, cudnn_tf32):
    """On CUDA the packed step's matrix products (convolutions computed as GEMMs) may use TF32
    exactly when cuDNN's convolutions may; the setting comes back afterwards, and a CPU step
    leaves it alone. Only flags are touched, so this runs without a GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    matmul = torch.backends.cuda.matmul  # its flags are properties: set and restored by hand
    saved = matmul.allow_tf32
    matmul.allow_tf32 = not cudnn_tf32
    try:
        with cvae.packed.matmuls_as_precise_as_convolutions(torch.device("cuda")):
            assert matmul.allow_tf32 is cudnn_tf32
        assert matmul.allow_tf32 is (not cudnn_tf32)
        with cvae.packed.matmuls_as_precise_as_convolutions(torch.device("cpu")):
            assert matmul.allow_tf32 is (not cudnn_tf32)
    finally:
        matmul.allow_tf32 = saved


def test_packed_forward_and_backward_run_in_the_convolutions_precision(monkeypatch):
    """Both the GEMM-form convolutions of the forward and the gradients (whose matrix
    products autograd runs in the backward) happen inside that setting."""
    inside, seen = [False], {"forward": [], "backward": []}
    real_context = cvae.packed.matmuls_as_precise_as_convolutions
    devices = []

    def spy(device):
        devices.append(device)

        class Context:
            def __enter__(self):
                self.real = real_context(device)
                self.real.__enter__()
                inside[0] = True

            def __exit__(self, *exc):
                inside[0] = False
                return self.real.__exit__(*exc)

        return Context()

    real_pointwise = cvae.packed._PointwiseConv2d.forward
    real_grad = torch.autograd.grad

    def pointwise(self, x):
        seen["forward"].append(inside[0])
        return real_pointwise(self, x)

    def grad(*args, **kwargs):
        seen["backward"].append(inside[0])
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(cvae.packed, "matmuls_as_precise_as_convolutions", spy)
    monkeypatch.setattr(cvae.packed._PointwiseConv2d, "forward", pointwise)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    clips, labels, _, _ = _data()
    trainer = PackedTrainer(*_states(), convolutions="matmul_1x1")
    trainer.train_epoch(clips, labels)
    assert devices and all(d.type == "cpu" for d in devices)
    assert seen["forward"] and all(seen["forward"])
    assert seen["backward"] and all(seen["backward"])


def test_tf32_set_through_the_new_api_stands():
    """A TF32 choice made with torch's per-operator ``fp32_precision`` API, which torch will
    not mix with the ``allow_tf32`` flags, is left as it is (and raises nothing)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with cvae.packed.matmuls_as_precise_as_convolutions(torch.device("cuda")):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved
    assert matmul.fp32_precision == saved


@pytest.mark.parametrize("conv_precision", ["tf32", "ieee"])
def test_convolution_tf32_is_read_through_either_api(conv_precision):
    """Set per operator so that the ``allow_tf32`` flag cannot say it (cuDNN's RNNs and
    convolutions differ: torch refuses to read the flag), the convolutions' own setting
    answers; the packed GEMMs follow it."""
    cudnn = torch.backends.cudnn
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    matmul = torch.backends.cuda.matmul
    saved_matmul = matmul.allow_tf32
    try:
        cudnn.conv.fp32_precision = conv_precision
        cudnn.rnn.fp32_precision = "ieee" if conv_precision == "tf32" else "tf32"
        with pytest.raises(RuntimeError):
            _ = cudnn.allow_tf32
        assert cvae.packed.convolutions_may_use_tf32() is (conv_precision == "tf32")
        with cvae.packed.matmuls_as_precise_as_convolutions(torch.device("cuda")):
            assert matmul.allow_tf32 is (conv_precision == "tf32")
        assert matmul.allow_tf32 is saved_matmul
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved
    assert cudnn.allow_tf32 is True  # torch's default state is back
