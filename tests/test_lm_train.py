"""crosslora_jax.lm.train: the loop on toy losses, then train_lora on tiny fixture models against peft."""

from __future__ import annotations

import dataclasses
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


def test_warmup_cosine_is_optax_and_cosine_can_end_above_zero():
  import optax
  config = TrainConfig(steps=16, lr=1e-3, warmup=2, schedule="warmup_cosine", final_lr_fraction=0.1)
  reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 16, end_value=1e-4)
  assert [float(make_schedule(config)(s)) for s in range(17)] == [float(reference(s)) for s in range(17)]
  floor = make_schedule(TrainConfig(steps=10, lr=1.0, warmup=2, final_lr_fraction=0.25))
  assert float(floor(2)) == pytest.approx(1.0) and float(floor(10)) == pytest.approx(0.25)
  assert float(floor(6)) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_callback_sees_every_kth_step_and_keeps_the_run_unchanged():
  x, y, w, lora = _toy_problem(seed=3)
  config = TrainConfig(steps=7, batch=8, lr=0.02, schedule="constant", log_every=1)
  plain = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  seen, kept = [], {}

  def between(step, lora_, loss):
    seen.append((step, float(loss)))
    kept[step] = jax.tree.map(jnp.copy, lora_)  # the live LoRA is donated to the next step

  watched = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False, callback=between,
                callback_every=3)
  assert [s for s, _ in seen] == [3, 6, 7]  # every 3rd step and the last
  assert [l for _, l in seen] == [plain.losses[i - 1] for i in (3, 6, 7)]
  assert watched.losses == plain.losses and not watched.stopped_early  # the optimizer state carried on
  jax.tree.map(np.testing.assert_array_equal, kept[7], watched.lora)
  short = fit(_weighted_loss, lora, _sampler(x, y, w, dataclasses.replace(config, steps=3)),
              dataclasses.replace(config, steps=3), progress=False)
  jax.tree.map(np.testing.assert_array_equal, kept[3], short.lora)


def test_callback_stops_early_even_on_a_diverged_step():
  x, y, w, lora = _toy_problem(seed=4)
  config = TrainConfig(steps=10, batch=8, lr=0.02, log_every=1)
  early = fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False,
              callback=lambda step, _lora, _loss: step == 4)
  assert len(early.losses) == 4 and early.stopped_early

  def bad_loss(lora_, batch):
    return _weighted_loss(lora_, batch)[0] * jnp.float32(np.inf)

  stopped = fit(bad_loss, lora, _sampler(x, y, w, config), config, progress=False,
                callback=lambda _step, _lora, loss: not np.isfinite(float(loss)))
  assert len(stopped.losses) == 1 and stopped.stopped_early  # no "finite losses expected" error
  with pytest.raises(CrossLoraError, match="callback_every"):
    fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False, callback=print, callback_every=0)


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
    (dict(final_lr_fraction=1.5), "TrainConfig.final_lr_fraction"),
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


def test_progress_always_draws_in_a_log_too(capfd):
  x, y, w, lora = _toy_problem()
  config = TrainConfig(steps=3, batch=8, log_every=1)
  fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress="always", description="toy")
  err = capfd.readouterr().err
  assert "toy" in err and "3/3" in err


def test_progress_bar_with_eta_on_a_terminal(monkeypatch):
  import io
  import sys

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  x, y, w, lora = _toy_problem()
  config = TrainConfig(steps=3, batch=8, log_every=1)
  fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=True, description="toy")
  text = terminal.getvalue()
  assert "toy" in text and "3/3" in text and "<" in text and "loss=" in text  # tqdm's [elapsed<remaining]
  terminal.truncate(0)
  fit(_weighted_loss, lora, _sampler(x, y, w, config), config, progress=False)
  assert terminal.getvalue().strip("\x00") == ""


# --- train_lora on tiny fixture models (real transformers + peft on the other side) -----------------

TINY_VOCAB = 128
# One optimizer setting for most tests below: equal settings, spec and shapes share one compiled step.
TINY = TrainConfig(steps=6, batch=4, lr=2e-2, warmup=2, grad_accum=2)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  from fixtures import make_model

  folders = {}
  for kind in ("llama", "qwen2", "gpt2"):
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    make_model(kind, folder, seed=0)
    folders[kind] = folder
  return folders


def _tiny_blocks(seed=0, n=12, length=16):
  return np.random.default_rng(seed).integers(0, TINY_VOCAB, size=(n, length))


def _spec(kind, **kwargs):
  from fixtures import DEFAULT_MODULES, LORA_MODULES

  from crosslora_jax.lm import LoraSpec

  return LoraSpec(r=4, alpha=8, target_modules=tuple(LORA_MODULES.get(kind, DEFAULT_MODULES)),
                  fan_in_fan_out=kind == "gpt2", **kwargs)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_trained_adapter_loads_in_peft_with_the_same_logits(tiny_models, tmp_path, kind):
  import torch
  from peft_helpers import load_with_adapter

  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import train_lora

  model = jlm.load(tiny_models[kind])
  out = tmp_path / "adapter"
  result = train_lora(model, _tiny_blocks(), TINY, spec=_spec(kind), progress=False, output=out)
  assert result.path == out and sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                                           "adapter_model.safetensors"]
  assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
  peft_model, caught = load_with_adapter(tiny_models[kind], out)
  assert caught == []
  ids = _tiny_blocks(seed=9, n=2, length=12)
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    with peft_model.disable_adapter():
      base = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model.with_lora(result.lora, result.spec).logits(ids))
  assert np.abs(theirs - base).max() > 1e-2  # the adapter acts at all
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
  assert np.abs(ours - np.asarray(model.logits(ids))).max() > 1e-2


def test_default_loss_is_the_weighted_next_token_nll(tiny_models):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import block_sampler, train_lora

  model = jlm.load(tiny_models["llama"])
  blocks = _tiny_blocks(seed=1)
  weights = np.random.default_rng(2).uniform(0.0, 1.0, size=blocks.shape).astype(np.float32)
  weights[:, 5:9] = 0.0
  result = train_lora(model, blocks, TINY, weights=weights, spec=_spec("llama"), progress=False)
  batch = block_sampler(blocks.astype(np.int32), weights, TINY)(0)
  logprobs = np.asarray(model.token_logprobs(batch["ids"]), np.float64)  # the init LoRA has B = 0: the base
  target_weights = batch["weights"][:, 1:]
  expect = -(logprobs * target_weights).sum() / target_weights.sum()
  assert result.losses[0] == pytest.approx(expect, rel=1e-5)
  assert result.losses[0] != pytest.approx(float(model.nll(batch["ids"]).mean()), rel=1e-4)


def test_train_lora_is_bit_deterministic(tiny_models):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import train_lora

  model = jlm.load(tiny_models["llama"])
  config = dataclasses.replace(TINY, seed=3)
  runs = [train_lora(model, _tiny_blocks(), config, spec=_spec("llama"), progress=False) for _ in range(2)]
  assert runs[0].losses == runs[1].losses
  for path, pair in runs[0].adapter.modules.items():
    other = runs[1].adapter.modules[path]
    assert pair.a_ri.tobytes() == other.a_ri.tobytes() and pair.b_or.tobytes() == other.b_or.tobytes()
  third = train_lora(model, _tiny_blocks(), dataclasses.replace(TINY, seed=4), spec=_spec("llama"), progress=False)
  assert third.losses != runs[0].losses


def test_continue_from_a_loaded_adapter_and_from_init(tiny_models, tmp_path):
  from fixtures import make_adapter, make_model

  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import train_lora

  adapter_dir = tmp_path / "start"
  make_adapter(make_model("llama"), adapter_dir, kind="llama", r=4, alpha=8)
  model = jlm.load(tiny_models["llama"], adapter=adapter_dir)
  resumed = train_lora(model, _tiny_blocks(), TINY, progress=False)
  assert resumed.spec == model.spec
  assert resumed.losses[0] == pytest.approx(float(model.nll(_first_batch(TINY)).mean()), rel=1e-5)
  explicit = train_lora(model.with_lora(None, None), _tiny_blocks(), TINY, init=model.lora, spec=model.spec,
                        progress=False)
  assert explicit.losses == resumed.losses


def _first_batch(config):
  from crosslora_jax.lm.train import block_sampler

  blocks = _tiny_blocks().astype(np.int32)
  return block_sampler(blocks, np.ones(blocks.shape, np.float32), config)(0)["ids"]


def test_custom_loss_fn_and_batch_list(tiny_models):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm import model as lm_model
  from crosslora_jax.lm.train import train_lora

  model = jlm.load(tiny_models["llama"])
  spec = _spec("llama")
  teacher = np.asarray(model.token_logprobs(_tiny_blocks()[:4]))
  batches = [{"ids": _tiny_blocks()[:4].astype(np.int32), "teacher": teacher}]

  def distill(lora, batch, params):  # pull the student's logprobs toward fixed targets
    student = lm_model.token_logprobs(params, lora, spec, model.config, batch["ids"])
    return ((student - (batch["teacher"] - 0.5)) ** 2).mean()

  result = train_lora(model, batches, TrainConfig(steps=6, batch=4, lr=1e-2, warmup=1, schedule="constant"),
                      spec=spec, loss_fn=distill, progress=False)
  assert result.losses[0] == pytest.approx(0.25, rel=1e-4)
  assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("data, weights, message", [
    (np.zeros((0, 16), np.int64), None, "data: token blocks of shape (n_blocks >= 1, length >= 2) expected"),
    ([], None, "data: training batches or token blocks expected, got an empty sequence"),
    (np.zeros((4, 1), np.int64), None, "data: token blocks of shape"),
    (np.full((4, 8), TINY_VOCAB), None, f"data: token ids in [0, {TINY_VOCAB}) expected"),
    (np.zeros((4, 8), np.float32), None, "data: integer token ids expected"),
    (np.zeros((4, 8), np.int64), np.ones((4, 7)), "weights: shape (4, 8)"),
    (np.zeros((4, 8), np.int64), np.zeros((4, 8)), "weights: finite values >= 0"),
    (np.zeros((4, 8), np.int64), -np.ones((4, 8)), "weights: finite values >= 0"),
])
def test_bad_data_is_one_line(tiny_models, data, weights, message):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import train_lora

  model = jlm.load(tiny_models["llama"])
  with pytest.raises(CrossLoraError) as caught:
    train_lora(model, data, TrainConfig(steps=1, batch=4), weights=weights, spec=_spec("llama"), progress=False)
  assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_no_spec_and_existing_output_fail_before_training(tiny_models, tmp_path):
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm.train import train_lora

  model = jlm.load(tiny_models["llama"])
  with pytest.raises(CrossLoraError, match="spec: a LoraSpec"):
    train_lora(model, _tiny_blocks(), TrainConfig(steps=1, batch=4), progress=False)
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "keep.txt").write_text("mine")
  with pytest.raises(CrossLoraError, match="a path that does not exist expected"):
    train_lora(model, _tiny_blocks(), TINY, spec=_spec("llama"), output=taken, progress=False)
  assert [p.name for p in taken.iterdir()] == ["keep.txt"]
  tight = dataclasses.replace(TINY, memory_budget_gb=1e-5)
  with pytest.raises(CrossLoraError, match="TrainConfig.memory_budget_gb"):
    train_lora(model, _tiny_blocks(), tight, spec=_spec("llama"), output=tmp_path / "new", progress=False)
  assert not (tmp_path / "new").exists()


# --- the real SmolLM2: the JAX trainer against the torch recipe, step for step -----------------------

@pytest.mark.realmodels
def test_smollm2_short_recipe_matches_torch_step_for_step(tmp_path):
  """textdata.train_lora's recipe, shortened (3 steps x 4 blocks x 64 tokens, r 8 / alpha 16, lr 4e-3).

  Both sides start from torch's LoRA init and see torch's batches, so any gap is
  the trainer's: the JAX-trained adapter, loaded in peft, must score the held-out
  blocks like the torch-trained one, and give the JAX model's logits.
  """
  import torch
  from peft import LoraConfig, PeftModel, get_peft_model
  from peft_helpers import captured_warnings
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from crosslora_bench import textdata, zoo
  from crosslora_jax import lm as jlm
  from crosslora_jax.lm import LoraSpec
  from crosslora_jax.lm.train import train_lora

  folder = zoo.fetch_model("smollm2-135m")
  torch.set_num_threads(2)
  tokenizer = AutoTokenizer.from_pretrained(folder)
  blocks = textdata.token_blocks(tokenizer, textdata.train_texts(), 64)
  heldout = textdata.heldout_blocks(tokenizer, n=8, block_size=64)
  steps, batch, seed = 3, 4, 0
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model.config.use_cache = False
  model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=list(textdata.SEVEN_MODULES)))
  init = {}
  for name, param in model.named_parameters():
    if ".lora_" in name:
      path = name.split("base_model.model.", 1)[1].split(".lora_")[0]
      init.setdefault(path, {})["a" if ".lora_A." in name else "b"] = jnp.asarray(param.detach().numpy().copy())
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=4e-3, weight_decay=0.0)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: 1.0 if s < 1 else 0.5 * (1 + math.cos(math.pi * (s - 1) / (steps - 1))))
  generator = torch.Generator().manual_seed(seed)
  batches, torch_losses = [], []
  model.train()
  for _ in range(steps):
    ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=generator)]
    batches.append({"ids": ids.numpy().astype(np.int32)})
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    torch_losses.append(loss.item())
  model.eval()
  torch_nll, torch_blocks = textdata.mean_nll(model, heldout)
  del model

  base = jlm.load(folder)
  config = TrainConfig(steps=steps, batch=batch, lr=4e-3, warmup=1, clip_norm=1.0, weight_decay=0.0, seed=seed)
  result = train_lora(base, batches, config, init=init, spec=LoraSpec(r=8, alpha=16,
                      target_modules=textdata.SEVEN_MODULES), output=tmp_path / "jax-adapter", progress=False)
  np.testing.assert_allclose(result.losses, torch_losses, rtol=2e-4)
  with captured_warnings() as caught:
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                       str(tmp_path / "jax-adapter")).eval()
  assert caught == []
  jax_nll, jax_blocks = textdata.mean_nll(loaded, heldout)
  assert abs(jax_nll - torch_nll) < 2e-3, (jax_nll, torch_nll)
  with loaded.disable_adapter():
    base_nll = textdata.mean_nll(loaded, heldout)[0]
  assert base_nll - jax_nll > 0.005  # the three steps moved the model at all
  with torch.no_grad():
    theirs = loaded(input_ids=heldout[:2]).logits.numpy()
  ours = np.asarray(base.with_lora(result.lora, result.spec).logits(heldout[:2].numpy()))
  assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.999
