"""crosslora_jax.lm.train: the loop on toy losses, then train_lora on tiny fixture models against peft."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosslora_jax import CrossLoraError
from crosslora_jax.lm.train import TrainConfig, fit, make_optimizer, make_schedule


def _toy_problem(seed=0, n=64, d_in=6, d_out=3, rank=2):
  """Low-rank regression: a LoRA-shaped {"m": {"a", "b"}} fit to targets of a hidden low-rank map."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  true = rng.normal(size=(d_out, rank)) @ rng.normal(size=(rank, d_in))
  y = (x @ true.T).astype(np.float32)
  weights = rng.uniform(0.2, 2.0, size=(n,)).astype(np.float32)
  lora = {"m": {"a": rng.normal(size=(rank, d_in)).astype(np.float32) * 0.3,
                "b": rng.normal(size=(d_out, rank)).astype(np.float32) * 0.3}}
  return x, y, weights, lora


def _weighted_loss(lora, batch):
  pred = batch["x"] @ (lora["m"]["b"] @ lora["m"]["a"]).T
  per_row = ((pred - batch["y"]) ** 2).sum(-1)
  return (batch["w"] * per_row).sum(), batch["w"].sum()


def _sampler(x, y, w, config):
  index = np.random.default_rng(config.seed).integers(0, x.shape[0], size=(config.steps, config.batch))
  return lambda step: {"x": x[index[step]], "y": y[index[step]], "w": w[index[step]]}


def test_fit_lowers_the_loss_and_leaves_the_input_alone():
  x, y, w, lora = _toy_problem()
  before = jax.tree.map(np.copy, lora)
  config = TrainConfig(steps=60, batch=16, lr=0.05, warmup=5, schedule="constant")
  result = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  assert len(result.losses) == 60 and len(result.grad_norms) == 60
  assert np.mean(result.losses[-5:]) < 0.2 * np.mean(result.losses[:5])
  jax.tree.map(np.testing.assert_array_equal, lora, before)
  assert result.compile_seconds > 0 and result.seconds > 0 and result.memory_bytes > 0


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_accumulated_microbatches_make_the_full_batch_update(accum):
  """Unequal weights per microbatch: the update is the full batch's Σw·l / Σw, not a mean of means."""
  x, y, w, lora = _toy_problem(seed=3)
  results = {}
  for grad_accum in (1, accum):
    config = TrainConfig(steps=3, batch=16, lr=0.01, warmup=1, grad_accum=grad_accum, clip_norm=0.5)
    results[grad_accum] = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  np.testing.assert_allclose(results[accum].losses, results[1].losses, rtol=1e-6)
  np.testing.assert_allclose(results[accum].grad_norms, results[1].grad_norms, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               results[accum].lora, results[1].lora)
  # a mean of per-microbatch means differs from the full-batch loss here, so the check above can fail
  first = _sampler(x, y, w, TrainConfig(steps=3, batch=16))(0)
  pairs = [_weighted_loss(lora, {k: v[i * 16 // accum:(i + 1) * 16 // accum] for k, v in first.items()})
           for i in range(accum)]
  mean_of_means = np.mean([float(n / d) for n, d in pairs])
  assert abs(mean_of_means - results[1].losses[0]) > 1e-3 * results[1].losses[0]


def test_scalar_loss_averages_microbatches():
  x, y, w, lora = _toy_problem(seed=4)

  def mean_loss(lora_, batch):
    numerator, denominator = _weighted_loss(lora_, {**batch, "w": jnp.ones_like(batch["w"])})
    return numerator / denominator

  out = {}
  for grad_accum in (1, 4):
    config = TrainConfig(steps=2, batch=8, lr=0.01, grad_accum=grad_accum)
    out[grad_accum] = fit(mean_loss, lora, _sampler(x, y, w, config), config, progress=False)
  np.testing.assert_allclose(out[4].losses, out[1].losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out[4].lora, out[1].lora)


def test_three_argument_loss_gets_the_frozen_params():
  x, y, w, lora = _toy_problem(seed=5)
  frozen = {"scale": jnp.float32(2.0)}

  def loss(lora_, batch, params):
    numerator, denominator = _weighted_loss(lora_, batch)
    return params["scale"] * numerator, denominator

  config = TrainConfig(steps=2, batch=8, lr=0.01)
  scaled = fit(loss, lora, _sampler(x, y, w, config), config, params=frozen, progress=False)
  plain = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  np.testing.assert_allclose(scaled.losses[0], 2 * plain.losses[0], rtol=1e-6)


def test_same_seed_same_bits_other_seed_other_bits():
  x, y, w, lora = _toy_problem(seed=6)
  runs = []
  for seed in (7, 7, 8):
    config = TrainConfig(steps=5, batch=8, lr=0.02, seed=seed, grad_accum=2)
    runs.append(fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False))
  for a, b in zip(jax.tree.leaves(runs[0].lora), jax.tree.leaves(runs[1].lora)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert runs[0].losses == runs[1].losses
  assert runs[0].losses != runs[2].losses


def test_schedule_matches_the_torch_recipe():
  """(step + 1) / warmup, then 0.5 (1 + cos(pi (step - warmup) / (steps - warmup))), as LambdaLR in textdata."""
  config = TrainConfig(steps=16, lr=4e-3)
  schedule = make_schedule(config)
  warmup = 1
  for step in range(16):
    expect = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (16 - warmup)))
    assert float(schedule(step)) == pytest.approx(4e-3 * expect, rel=1e-6, abs=4e-3 * 1e-6)
  constant = make_schedule(TrainConfig(steps=20, lr=1e-3, warmup=4, schedule="constant"))
  assert [round(float(constant(s)) / 1e-3, 6) for s in (0, 1, 3, 4, 19)] == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_optimizer_matches_torch_adamw_with_clipping():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  start = rng.normal(size=(4, 5)).astype(np.float32)
  grads = [rng.normal(size=(4, 5)).astype(np.float32) * scale for scale in (3.0, 0.1, 2.0, 0.5)]
  config = TrainConfig(steps=4, lr=1e-2, warmup=2, weight_decay=0.1, clip_norm=1.0)
  optimizer = make_optimizer(config)
  params = jnp.asarray(start)
  state = optimizer.init(params)
  for g in grads:
    updates, state = optimizer.update(jnp.asarray(g), state, params)
    params = params + updates
  weight = torch.nn.Parameter(torch.tensor(start))
  torch_opt = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1)
  sched = torch.optim.lr_scheduler.LambdaLR(
      torch_opt, lambda s: (s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 2)))
  for g in grads:
    weight.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([weight], 1.0)
    torch_opt.step()
    sched.step()
  np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "TrainConfig.steps"),
    (dict(steps=-3), "TrainConfig.steps"),
    (dict(batch=0), "TrainConfig.batch"),
    (dict(lr=0.0), "TrainConfig.lr"),
    (dict(lr=float("nan")), "TrainConfig.lr"),
    (dict(batch=6, grad_accum=4), "TrainConfig.grad_accum"),
    (dict(schedule="linear"), "TrainConfig.schedule"),
    (dict(memory_budget_gb=0), "TrainConfig.memory_budget_gb"),
    (dict(memory_budget_gb=-1.0), "TrainConfig.memory_budget_gb"),
    (dict(clip_norm=0.0), "TrainConfig.clip_norm"),
    (dict(warmup=-1), "TrainConfig.warmup"),
])
def test_bad_config_is_one_line_naming_the_field(kwargs, field):
  with pytest.raises(CrossLoraError) as caught:
    TrainConfig(**kwargs)
  assert str(caught.value).startswith(field) and "\n" not in str(caught.value)


def test_a_step_over_the_memory_budget_is_refused_with_a_fix():
  x, y, w, lora = _toy_problem(seed=1, n=512, d_in=256, d_out=256, rank=4)
  config = TrainConfig(steps=2, batch=512, lr=0.01, grad_accum=1, memory_budget_gb=1e-6)
  with pytest.raises(CrossLoraError) as caught:
    fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  message = str(caught.value)
  assert message.startswith("TrainConfig.memory_budget_gb: a train step within 1e-06 GB expected")
  assert "\n" not in message and ("grad_accum" in message or "Lower the batch" in message)
  roomy = TrainConfig(steps=2, batch=512, lr=0.01, memory_budget_gb=8.0)
  assert len(fit(_weighted_loss, lora, _sampler(x, y, w, roomy), roomy, progress=False).losses) == 2


def test_a_diverging_run_stops_with_one_line():
  x, y, w, lora = _toy_problem(seed=2)

  def bad_loss(lora_, batch):
    return _weighted_loss(lora_, batch)[0] * jnp.float32(np.inf)

  config = TrainConfig(steps=4, batch=8, lr=0.01, log_every=2)
  with pytest.raises(CrossLoraError, match="finite losses expected"):
    fit(bad_loss, lora, _sampler(x, y, w, config), config, progress=False)


def test_wrong_batch_size_is_refused():
  x, y, w, lora = _toy_problem()
  config = TrainConfig(steps=2, batch=8)
  with pytest.raises(CrossLoraError, match="leading axis of TrainConfig.batch=8"):
    fit(_weighted_loss, lora, lambda step: {"x": x[:4], "y": y[:4], "w": w[:4]}, config, progress=False)


def test_quiet_without_a_terminal(capfd):
  x, y, w, lora = _toy_problem()
  config = TrainConfig(steps=3, batch=8, log_every=1)
  fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=True)
  captured = capfd.readouterr()
  assert captured.err == "" and captured.out == ""
