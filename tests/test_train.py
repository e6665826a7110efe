"""The training loop on tiny CPU data: determinism, exact resume, learning, failure paths,
evaluation (best-of-N, the mean of N, the prior mean, its own noise stream) and the learned
prior."""

import copy
import math
from dataclasses import replace

import pytest
import torch

import cvae.train
from cvae.checkpoints import load_training_checkpoint, save_training_checkpoint
from cvae.data import DatasetError
from cvae.metrics import psnr_per_frame
from cvae.model import VideoCVAE
from cvae.schedules import ConstantKL, CyclicalKL, TeacherForcing
from cvae.train import (
    FitConfig,
    FitState,
    Hooks,
    NonFiniteLossError,
    copy_first_floor,
    evaluate,
    evaluate_after,
    evaluation_generator,
    fit,
    generate,
    new_fit_state,
    to_unit,
)

DIMS = {"frame_dim": 16, "label_dim": 8, "latent_dim": 4, "decoder_dim": 16}
H, W = 8, 16

# Teacher forcing drawn per batch with probability 0.5, a per-iteration cyclical beta, a cosine
# lr and a sampled best-of-2 validation: every random stream and schedule matters on resume.
CONFIG = FitConfig(
    epochs=4, batch_size=2, lr=2e-3, lr_schedule="cosine",
    kl=CyclicalKL(cycles=2, ratio=0.5, start=0.1, stop=1.0, per="iteration"),
    teacher_forcing=TeacherForcing(ratio=0.5, decay_start=0, decay_step=0.1, mode="batch"),
    eval_every=1, eval_latent="prior_sample", eval_samples=2,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny model is per-op-overhead bound: one thread is faster and immune to a busy box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def square_video(length: int, *, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A white square bouncing over a dark-grey frame; its label is the same square in red on
    white. (L, 3, H, W) uint8 each: the label says where the square is, the frame its look."""
    frames = torch.full((length, 3, H, W), 0.2)
    labels = torch.ones(length, 3, H, W)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    period = 2 * (W - size)
    for i in range(length):
        x = i % period
        x = x if x <= W - size else period - x
        y = (i // 3) % (H - size + 1)
        frames[i, :, y : y + size, x : x + size] = 1.0
        labels[i, :, y : y + size, x : x + size] = red
    return (frames * 255).round().to(torch.uint8), (labels * 255).round().to(torch.uint8)


def toy_data(clips: int, clip_length: int, val_length: int):
    frames, labels = square_video(clips * clip_length + val_length + 7)
    n = clips * clip_length
    shape = (clips, clip_length, 3, H, W)
    val = slice(n + 7, n + 7 + val_length)  # a stretch the clips do not cover
    return (frames[:n].reshape(shape), labels[:n].reshape(shape), frames[val], labels[val])


DATA = toy_data(clips=6, clip_length=5, val_length=10)  # 3 batches per epoch


class Recorder(Hooks):
    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def build(seed: int, config: FitConfig = CONFIG, **model_options) -> FitState:
    torch.manual_seed(seed)
    model = VideoCVAE(**{**DIMS, **model_options})
    return new_fit_state(model, config, seed=seed)


def run(state: FitState, config: FitConfig = CONFIG, data=DATA, stop_at: int | None = None):
    recorder = Recorder()
    fit(state, *data, config, hooks=recorder,
        should_stop=lambda: stop_at is not None and state.epoch >= stop_at)
    return recorder.logged


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index in sa["state"]:
        assert_same_tensors(sa["state"][index], sb["state"][index])


# ---------------------------------------------------------------------------------------------
# (a) determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_run_and_another_seed_differs():
    config = replace(CONFIG, epochs=1)
    first, second, other = build(0, config), build(0, config), build(1, config)
    logs = [run(first, config), run(second, config), run(other, config)]
    assert logs[0] == logs[1]
    assert_same_tensors(first.model.state_dict(), second.model.state_dict())
    assert logs[0] != logs[2]
    assert not torch.equal(first.model.generator[-1].weight, other.model.generator[-1].weight)


# ---------------------------------------------------------------------------------------------
# (b) resume equals straight
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run():
    """CONFIG's 4 epochs in one go, shared by the resume tests."""
    straight = build(0)
    return straight, run(straight)


def test_resume_equals_straight(tmp_path, straight_run):
    straight, straight_log = straight_run
    assert [step for step, _ in straight_log] == [0, 1, 2, 3]

    first = build(0)
    first_log = run(first, stop_at=2)
    assert first.epoch == 2 and [step for step, _ in first_log] == [0, 1]
    path = save_training_checkpoint(first.state_dict(), tmp_path / "run" / "last.pt")

    resumed = build(12345)  # other weights and RNG streams: loading must replace all of them
    assert not torch.equal(resumed.model.generator[-1].weight, first.model.generator[-1].weight)
    resumed.load_state_dict(load_training_checkpoint(path))
    assert resumed.epoch == 2 and resumed.last_metrics == first_log[-1][1]
    resumed_log = run(resumed)

    assert first_log + resumed_log == straight_log  # exact float equality, every metric
    assert_same_tensors(resumed.model.state_dict(), straight.model.state_dict())  # + BN buffers
    assert_same_optimizer_state(resumed.optimizer, straight.optimizer)
    assert torch.equal(resumed.data_generator.get_state(), straight.data_generator.get_state())
    assert torch.equal(resumed.noise_generator.get_state(), straight.noise_generator.get_state())
    assert (resumed.best_val_psnr, resumed.best_epoch) == (
        straight.best_val_psnr, straight.best_epoch)


def test_resume_without_rng_state_diverges(straight_run):
    """The resume test above can fail: dropping the RNG streams changes the continuation."""
    _, straight_log = straight_run
    first = build(0)
    first_log = run(first, stop_at=2)
    blob = first.state_dict()
    resumed = build(12345)
    blob["data_rng"] = resumed.data_generator.get_state()
    blob["noise_rng"] = resumed.noise_generator.get_state()
    resumed.load_state_dict(blob)
    assert first_log + run(resumed) != straight_log


# ---------------------------------------------------------------------------------------------
# (c) it learns
# ---------------------------------------------------------------------------------------------
def test_short_fit_learns_the_toy_video():
    clips, clip_labels, val_frames, val_labels = toy_data(clips=8, clip_length=5, val_length=16)
    config = FitConfig(epochs=16, batch_size=2, lr=5e-3, lr_schedule="constant",
                       kl=ConstantKL(1e-4), teacher_forcing=TeacherForcing(ratio=0.0),
                       eval_every=16, eval_latent="prior_mean")
    state = build(0, config)
    logged = run(state, config, data=(clips, clip_labels, val_frames, val_labels))
    psnr = logged[-1][1]["val/psnr"]
    floor = float(copy_first_floor(val_frames).mean())
    truth = to_unit(val_frames)[1:]
    background = torch.full_like(truth, 0.2)  # a model that only learned the empty studio
    background_psnr = float(psnr_per_frame(background, truth).mean())
    assert psnr > floor + 5.0, (psnr, floor)
    assert psnr > background_psnr + 5.0, (psnr, background_psnr)  # it draws the square


def test_bf16_training_learns_and_starts_where_fp32_does():
    """precision="bf16": the training forward under bf16 autocast, parameters, optimizer and
    evaluation in fp32. From the same start its first epoch's loss is fp32's within bf16
    rounding, and it learns the toy video (where the two end up differs run to run: on this
    toy fp32 and bf16 reach 34 and 40 dB, both far above the floor)."""
    clips, clip_labels, val_frames, val_labels = toy_data(clips=8, clip_length=5, val_length=16)
    floor = float(copy_first_floor(val_frames).mean())
    first = {}
    for precision in ("fp32", "bf16"):
        config = FitConfig(epochs=16, batch_size=2, lr=5e-3, lr_schedule="constant",
                           kl=ConstantKL(1e-4), teacher_forcing=TeacherForcing(ratio=0.0),
                           eval_every=16, eval_latent="prior_mean", precision=precision)
        state = build(0, config)
        logged = run(state, config, data=(clips, clip_labels, val_frames, val_labels))
        first[precision] = logged[0][1]["train/loss"]
        assert all(p.dtype == torch.float32 for p in state.model.parameters())
        assert logged[-1][1]["val/psnr"] > floor + 5.0, (precision, logged[-1][1], floor)
    assert first["bf16"] != first["fp32"]  # bf16 really ran
    assert abs(first["bf16"] - first["fp32"]) < 0.02 * first["fp32"], first


# ---------------------------------------------------------------------------------------------
# (d) non-finite loss
# ---------------------------------------------------------------------------------------------
def test_absurd_learning_rate_raises_non_finite_loss():
    config = FitConfig(epochs=1, batch_size=2, lr=1e6, lr_schedule="constant",
                       teacher_forcing=TeacherForcing(ratio=0.0))
    data = toy_data(clips=4, clip_length=4, val_length=6)  # 2 batches: the 2nd sees the wreck
    state = build(0, config)
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError, match="epoch 0"):
        fit(state, *data, config, hooks=recorder)
    assert recorder.logged == [] and state.epoch == 0  # nothing logged, no epoch counted
    # The weights really went non-finite (the error is not a false alarm).
    assert not all(torch.isfinite(p).all() for p in state.model.parameters())

    sane = replace(config, lr=1e-3)
    run(build(0, sane), sane, data=data)  # the same run at a sane lr does not raise


def test_a_batch_larger_than_the_clips_stops_before_any_training():
    config = replace(CONFIG, batch_size=7)  # DATA has 6 clips
    state = build(0, config)
    before = copy.deepcopy(state.model.state_dict())
    recorder = Recorder()
    with pytest.raises(DatasetError, match="batch size 7 is larger than the 6 training clips"):
        fit(state, *DATA, config, hooks=recorder)
    assert recorder.logged == [] and state.epoch == 0
    assert_same_tensors(state.model.state_dict(), before)


def test_eval_every_beyond_the_epochs_evaluates_once_at_the_last_epoch():
    config = replace(CONFIG, epochs=3, eval_every=1000)
    logged = run(build(0, config), config)
    assert [step for step, metrics in logged if "val/psnr" in metrics] == [2]
    assert [step for step, _ in logged] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# (e) evaluation: best-of-N, the mean of N and the deterministic prior mean
# ---------------------------------------------------------------------------------------------
def _sample_by_hand(model: VideoCVAE, frames, labels, eps_steps, index):
    """Sample ``index`` of a batched prior rollout, one frame at a time with its own eps."""
    truth, pose = to_unit(frames), to_unit(labels)
    prev, outputs = truth[0:1], [truth[0]]
    with torch.no_grad():
        for t in range(1, truth.shape[0]):
            z = eps_steps[t - 1][index : index + 1]  # N(0, I) prior: z = 0 + 1 * eps
            prev = model.decode(prev, pose[t : t + 1], z)
            outputs.append(prev[0])
    return torch.stack(outputs)


def _evaluated_and_by_hand(reduce: str, *, seed: int = 7, n: int = 3):
    """``evaluate`` of n prior samples from ``manual_seed(seed)``, and the same n samples made
    one at a time (step t of the batch draws eps of shape (n, N, H, W)); and the truth."""
    _, _, frames, labels = DATA
    model = build(0).model.eval()
    result = evaluate(model, frames, labels, latent="prior_sample", samples=n, reduce=reduce,
                      generator=torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)
    eps_steps = [torch.randn((n, DIMS["latent_dim"], H, W), generator=replay)
                 for _ in range(frames.shape[0] - 1)]
    singles = [_sample_by_hand(model, frames, labels, eps_steps, k) for k in range(n)]
    return result, singles, to_unit(frames)


def test_best_of_samples_is_the_best_of_the_individual_samples():
    result, singles, truth = _evaluated_and_by_hand("best")
    single_psnrs = [float(psnr_per_frame(s[1:], truth[1:]).mean()) for s in singles]
    assert max(single_psnrs) - min(single_psnrs) > 1e-3  # the samples do differ
    for value in single_psnrs:
        assert result.psnr >= value - 1e-6
    best = max(range(len(singles)), key=single_psnrs.__getitem__)
    assert result.psnr == pytest.approx(single_psnrs[best], abs=1e-6)
    torch.testing.assert_close(result.predictions, singles[best], atol=1e-5, rtol=0)
    assert result.psnr_per_frame.shape == (truth.shape[0] - 1,)
    assert torch.equal(result.predictions[0], truth[0])


def test_mean_of_samples_averages_the_individual_samples():
    """reduce="mean": PSNR and MSE per frame averaged over the samples; predictions = sample 0."""
    result, singles, truth = _evaluated_and_by_hand("mean")
    psnrs = torch.stack([psnr_per_frame(s[1:], truth[1:]) for s in singles])  # (n, L-1)
    mses = torch.stack([(s[1:] - truth[1:]).pow(2).flatten(1).mean(dim=1) for s in singles])
    assert float(psnrs.mean(dim=1).max() - psnrs.mean(dim=1).min()) > 1e-3  # they differ
    torch.testing.assert_close(result.psnr_per_frame, psnrs.mean(dim=0), atol=1e-5, rtol=0)
    assert result.psnr == pytest.approx(float(psnrs.mean()), abs=1e-6)
    assert result.loss == pytest.approx(float(mses.double().mean()), rel=1e-5)
    torch.testing.assert_close(result.predictions, singles[0], atol=1e-5, rtol=0)
    _, _, frames, labels = DATA
    with pytest.raises(ValueError, match="reduce='median'"):
        evaluate(build(0).model, frames, labels, reduce="median")


def test_prior_mean_is_deterministic_and_draws_no_noise():
    _, _, frames, labels = DATA
    model = build(0).model
    model.train()
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    a = evaluate(model, frames, labels, latent="prior_mean", samples=3, generator=generator)
    b = evaluate(model, frames, labels, latent="prior_mean",
                 generator=torch.Generator().manual_seed(99))
    assert torch.equal(a.predictions, b.predictions) and a.psnr == b.psnr
    assert torch.equal(generator.get_state(), before)
    assert model.training  # evaluation restores the caller's mode
    sampled = generate(model, frames[0], labels, latent="prior_sample", samples=2,
                       generator=torch.Generator().manual_seed(3))
    assert sampled.shape == (2, *frames.shape)
    assert not torch.equal(sampled[0], sampled[1])
    with pytest.raises(ValueError, match="prior_mean"):
        evaluate(model, frames, labels, latent="posterior")


# ---------------------------------------------------------------------------------------------
# (f) evaluation's own noise stream, and the prior-mean metric
# ---------------------------------------------------------------------------------------------
def _train_metrics(log):
    return [(step, {k: v for k, v in m.items() if k.startswith("train/")}) for step, m in log]


def test_evaluating_more_or_less_often_leaves_training_bit_for_bit():
    """Evaluation draws from a stream of its own, so how often a run evaluates (and with how
    many samples) changes nothing in training: every epoch's training loss is the same."""
    logs, states = [], []
    for every, samples in ((1, 2), (3, 1)):
        config = replace(CONFIG, eval_every=every, eval_samples=samples)
        states.append(build(0, config))
        logs.append(run(states[-1], config))
    often, rarely = logs
    assert [s for s, m in often if "val/psnr" in m] == [0, 1, 2, 3]
    assert [s for s, m in rarely if "val/psnr" in m] == [2, 3]
    assert _train_metrics(often) == _train_metrics(rarely)  # exact float equality
    assert_same_tensors(states[0].model.state_dict(), states[1].model.state_dict())
    assert torch.equal(states[0].noise_generator.get_state(),
                       states[1].noise_generator.get_state())


def test_runs_at_one_seed_share_each_evaluations_noise(monkeypatch):
    """Common random numbers: two different specs at one seed evaluate with the same draws at
    the same epoch (the generator (seed, epoch) seeds); another seed or epoch draws others."""
    drawn: list[tuple[int, torch.Tensor]] = []  # (run, generator state) per sampled rollout
    real = cvae.train.generate

    def spy(*args, generator=None, latent="prior_sample", **kwargs):
        if latent == "prior_sample":
            drawn.append(generator.get_state().clone())
        return real(*args, generator=generator, latent=latent, **kwargs)

    monkeypatch.setattr(cvae.train, "generate", spy)
    base = replace(CONFIG, epochs=2)
    other = replace(base, lr=5e-3, kl=ConstantKL(0.5), eval_samples=3,
                    teacher_forcing=TeacherForcing(ratio=0.0))
    streams = []
    for seed, config in ((0, base), (0, other), (1, base)):
        drawn.clear()
        run(build(seed, config), config)
        streams.append(list(drawn))
    same_seed, other_spec, other_seed = streams
    assert len(same_seed) == 2  # one evaluation per epoch
    for epoch, state in enumerate(same_seed):
        assert torch.equal(state, evaluation_generator(0, epoch).get_state())
        assert torch.equal(state, other_spec[epoch])
        assert not torch.equal(state, other_seed[epoch])
    assert not torch.equal(same_seed[0], same_seed[1])


def test_an_epochs_evaluation_is_the_same_wherever_it_is_made():
    """``evaluate_after`` (what the runner calls to rebuild a finished run's last evaluation)
    gives what ``fit`` evaluated at that epoch, to the bit."""
    config = replace(CONFIG, epochs=2)
    made: dict[int, cvae.train.Evaluation] = {}

    class Keep(Recorder):
        def on_evaluation(self, epoch, evaluation):
            made[epoch] = evaluation

    state = build(0, config)
    fit(state, *DATA, config, hooks=Keep())
    again = evaluate_after(state, config, DATA[2], DATA[3], epoch=1)
    assert torch.equal(again.psnr_per_frame, made[1].psnr_per_frame)
    assert torch.equal(again.predictions, made[1].predictions)
    other_epoch = evaluate_after(state, config, DATA[2], DATA[3], epoch=0)
    assert not torch.equal(other_epoch.predictions, made[1].predictions)


def test_every_evaluation_logs_the_prior_mean_psnr():
    config = replace(CONFIG, epochs=2, eval_every=1)
    state = build(0, config)
    log = run(state, config)
    assert all("val/psnr_prior_mean" in m for _, m in log)
    assert log[0][1]["val/psnr_prior_mean"] != log[1][1]["val/psnr_prior_mean"]
    _, _, frames, labels = DATA
    expected = evaluate(state.model, frames, labels, latent="prior_mean").psnr
    assert log[-1][1]["val/psnr_prior_mean"] == expected
    assert log[-1][1]["val/psnr"] != expected  # the protocol sampled z

    mean_protocol = replace(config, eval_latent="prior_mean")
    log = run(build(0, mean_protocol), mean_protocol)
    assert log[-1][1]["val/psnr_prior_mean"] == log[-1][1]["val/psnr"]


# ---------------------------------------------------------------------------------------------
# (g) learned prior
# ---------------------------------------------------------------------------------------------
def test_learned_prior_trains():
    config = replace(CONFIG, epochs=1)
    state = build(0, config, prior="learned")
    prior_before = copy.deepcopy(state.model.prior_head.state_dict())
    logged = run(state, config)
    metrics = logged[-1][1]
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["train/kl"] > 0
    # The prior head only enters the loss through KL(q || p): it moved, so that path trains.
    changed = [not torch.equal(prior_before[k], v)
               for k, v in state.model.prior_head.state_dict().items()]
    assert any(changed)


def _stepwise_loss(model, frames, labels, eps, *, teacher_forcing, detach_prev):
    """The template's way, frame by frame: per step encode the previous frame, the label and
    the current frame, take the posterior, decode; the lab's loss summed over steps."""
    total = frames.new_zeros(())
    prev = frames[:, 0]
    for t in range(1, frames.shape[1]):
        prev_features = model.frame_encoder(prev)
        if detach_prev:
            prev_features = prev_features.detach()
        label_features = model.label_encoder(labels[:, t])
        mu, logvar = model.posterior_from_features(model.frame_encoder(frames[:, t]),
                                                   label_features)
        z = mu + torch.exp(0.5 * logvar) * eps[:, t - 1]
        x_hat = model.activate(model.decode_from_features(prev_features, label_features, z))
        if model.prior_head is None:
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / frames.shape[0]
        else:
            mu_p, logvar_p = model.prior_from_features(prev_features, label_features)
            kl = 0.5 * torch.sum(logvar_p - logvar + torch.exp(logvar - logvar_p)
                                 + (mu - mu_p).pow(2) * torch.exp(-logvar_p) - 1) / frames.shape[0]
        total = total + torch.nn.functional.mse_loss(x_hat, frames[:, t]) + 0.3 * kl
        prev = frames[:, t] if teacher_forcing else x_hat
    return total


@pytest.mark.parametrize("teacher_forcing", [True, False])
@pytest.mark.parametrize("prior", ["standard_normal", "learned"])
@pytest.mark.parametrize("detach_prev", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batched_rollout_is_the_stepwise_rollout(teacher_forcing, prior, detach_prev, training):
    """The rollout runs the encoders, the posterior (and under teacher forcing the decoder)
    once over all frames and keeps only the autoregressive chain step by step: in float64 its
    loss and every gradient equal the template's frame-by-frame computation. In training the
    label encoder's BatchNorm takes each step's batch statistics and updates its running
    statistics once per step, as the template's loop does."""
    from cvae.train import rollout, rollout_loss

    torch.manual_seed(0)
    model = VideoCVAE(**DIMS, prior=prior).double().train(training)
    template = copy.deepcopy(model)
    frames, labels = square_video(10)
    frames = to_unit(frames).double().view(2, 5, 3, H, W)
    labels = to_unit(labels).double().view(2, 5, 3, H, W)
    eps = torch.randn(2, 4, DIMS["latent_dim"], H, W, dtype=torch.float64)

    reference = _stepwise_loss(template, frames, labels, eps, teacher_forcing=teacher_forcing,
                               detach_prev=detach_prev)
    expected = torch.autograd.grad(reference, list(template.parameters()))
    ours = rollout_loss(rollout(model, frames, labels, eps, teacher_forcing=teacher_forcing,
                                detach_prev=detach_prev), 0.3)[0]
    grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12, msg=name)
    for (name, got), want in zip(model.named_buffers(), template.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=name)
    if training:  # 4 steps: 4 updates of the running statistics
        assert model.label_encoder[2].num_batches_tracked.item() == 4


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_rollout_keeps_features_channels_last(teacher_forcing):
    """In a channels_last model every convolution that reads features (more than the 3
    channels of a frame) gets them channels_last: a feature tensor in NCHW would be copied to
    channels_last at each such convolution, forward and backward. Picking frames 2..T of the
    label features by a reshape did that to the posterior's 160-channel input."""
    from cvae.train import rollout, rollout_loss

    torch.manual_seed(0)
    model = VideoCVAE(**DIMS).to(memory_format=torch.channels_last)
    seen = []

    def check(module, inputs):
        x = inputs[0]
        if x.shape[1] > 3:
            seen.append((type(module).__name__, tuple(x.shape),
                         x.is_contiguous(memory_format=torch.channels_last)))

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(check)
    frames, labels = square_video(10)
    frames = to_unit(frames).view(2, 5, 3, H, W)
    labels = to_unit(labels).view(2, 5, 3, H, W)
    eps = torch.randn(2, 4, DIMS["latent_dim"], H, W)
    rollout_loss(rollout(model, frames, labels, eps, teacher_forcing=teacher_forcing), 1.0)[0]
    assert seen
    assert [s for s in seen if not s[2]] == []


def test_train_step_takes_one_step_and_reports_the_objective_per_frame():
    """``train_step`` (the library's one step, plain floats): the same generator gives the same
    step; the objective is the sum over the T-1 predicted frames of MSE + beta * KL, with
    ``mse`` and ``kl`` per predicted frame; the parameters move."""
    frames, labels = (to_unit(x).reshape(2, 6, 3, H, W) for x in square_video(12))
    torch.manual_seed(0)
    model = VideoCVAE(**DIMS)
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    results = [cvae.train.train_step(m, torch.optim.Adam(m.parameters(), 1e-3), frames, labels,
                                     beta=0.5, teacher_forcing=True,
                                     generator=torch.Generator().manual_seed(1))
               for m in (model, twin)]
    assert results[0] == results[1]
    step = results[0]
    assert all(math.isfinite(v) for v in (step.loss, step.mse, step.kl))
    assert step.loss == pytest.approx(5 * (step.mse + 0.5 * step.kl), rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
