"""refine_adapter end to end on tiny fixture models with two different tokenizers."""

import numpy as np
import pytest

from crosslora_jax.formats import peft_format
from crosslora_jax.refine import RefineConfig, refine_adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from refine_fixtures import make_refine_models
  return make_refine_models(tmp_path_factory.mktemp("refine"))


def _config(root, **overrides):
  # Unanchored token learning: the recipe whose harm the guard must catch (the default anchors it).
  base = dict(tokens=24 * 16, sample_tokens=16, steps=8, batch=4, lr=2e-2, eval_every=4, loss="nll", anchor=0.0,
              check="delta_error", cache_dir=str(root / "corpus-cache"))
  return RefineConfig(**{**base, **overrides})


def test_refine_trains_and_the_guard_holds_back_a_harmful_refine(models):
  # Learning the teacher's tokens outright moves the student's log-probs far more than the
  # adapter moved the source's: judged by delta matching on held-back text, that hurts.
  guarded = refine_adapter(models / "source", models / "adapter", models / "target", None, _config(models), progress=False)
  report = guarded.report
  losses = np.asarray(report["losses"])
  assert len(losses) == 8 and losses[-3:].mean() < losses[:3].mean() - 0.05  # the training loss goes down
  assert report["corpus"]["samples"] == 24 and report["tokens"]["heldout_samples"] == 3
  assert 0 < report["tokens"]["selected_tokens"] < report["tokens"]["learnable_tokens"]
  errors = [e["delta_error"] for e in report["heldout"]]
  assert min(errors[1:]) > errors[0]
  assert not guarded.refined and report["shipped"] == "initial" and report["best_step"] == 0
  assert all(not np.any(pair.b_or) for pair in guarded.adapter.modules.values())  # the zero-init adapter ships

  unguarded = refine_adapter(models / "source", models / "adapter", models / "target", None,
                             _config(models, guard=False), progress=False)
  assert unguarded.report["corpus"]["cache"] == "hit"  # the teacher wrote its text once
  assert unguarded.refined and unguarded.report["shipped"] == "refined"
  assert any(np.abs(pair.b_or).max() > 1e-4 for pair in unguarded.adapter.modules.values())
  np.testing.assert_allclose(unguarded.report["losses"], report["losses"], rtol=1e-5)  # deterministic for a seed


def test_pool_writes_more_and_trains_on_as_many(models):
  out = refine_adapter(models / "source", models / "adapter", models / "target", None,
                       _config(models, tokens=12 * 16, pool=2, steps=2, eval_every=2), progress=False)
  report = out.report
  assert report["corpus"]["samples"] == 24  # 12 samples' budget, written twice over
  assert report["tokens"]["heldout_samples"] == 2 and report["tokens"]["train_samples"] == 10
  assert report["tokens"]["unused_samples"] == 12 and report["tokens"]["learnable_tokens"] < 24 * 16
  assert report["config"]["pool"] == 2


def test_refine_from_an_init_adapter_keeps_its_spec(models, tmp_path):
  init = refine_adapter(models / "source", models / "adapter", models / "target", None,
                        _config(models, guard=False, steps=8), progress=False).adapter
  out = refine_adapter(models / "source", peft_format.read_adapter(models / "adapter"), models / "target", init,
                       _config(models, steps=8, check="nll_selected"), progress=False)
  assert out.report["init"] == "projection"
  assert set(out.adapter.modules) == set(init.modules)
  checks = [e["nll_selected"] for e in out.report["heldout"]]
  if out.refined:  # what ships is the checked step with the lowest held-back NLL, below the start's
    assert checks[[e["step"] for e in out.report["heldout"]].index(out.report["best_step"])] == min(checks) < checks[0]
  else:  # nothing beat the start: the init adapter ships, factor for factor
    assert min(checks[1:]) >= checks[0]
    for path, pair in init.modules.items():
      np.testing.assert_allclose(out.adapter.modules[path].b_or, pair.b_or, rtol=1e-6)


@pytest.mark.parametrize("which", ["source", "target"])
def test_a_model_without_tokenizer_is_one_line_before_any_work(models, tmp_path, which):
  import shutil
  from crosslora_jax.errors import CrossLoraError
  folders = {"source": models / "source", "target": models / "target"}
  bare = tmp_path / which
  shutil.copytree(folders[which], bare)
  (bare / "tokenizer.json").unlink()
  folders[which] = bare
  with pytest.raises(CrossLoraError) as info:
    refine_adapter(folders["source"], models / "adapter", folders["target"], None,
                   _config(models, cache_dir=str(tmp_path / "cache")), progress=False)
  assert "tokenizer" in str(info.value) and "\n" not in str(info.value)
  assert not (tmp_path / "cache").exists()  # nothing sampled, nothing cached


def test_the_target_writes_and_the_reward_loss_learns_only_what_the_adapter_changed(models, tmp_path):
  # writer="target": the student's own samples, scored by the teacher; the reward loss moves
  # the student only where the adapter changed the source, so a zero adapter moves nothing.
  config = _config(models, writer="target", loss="reward", guard=False, cache_dir=str(tmp_path / "cache"))
  moved = refine_adapter(models / "source", models / "adapter", models / "target", None, config, progress=False)
  assert moved.report["corpus"]["writer"] == "target" and moved.report["corpus"]["cache"] == "miss"
  assert any(np.abs(pair.b_or).max() > 1e-5 for pair in moved.adapter.modules.values())
  again = refine_adapter(models / "source", models / "adapter", models / "target", None, config, progress=False)
  assert again.report["corpus"]["cache"] == "hit"
  teacher_written = refine_adapter(models / "source", models / "adapter", models / "target", None,
                                   _config(models, loss="reward", guard=False, cache_dir=str(tmp_path / "cache")),
                                   progress=False)
  assert teacher_written.report["corpus"]["cache"] == "miss"  # the two writers never share a cache entry

  source = peft_format.read_adapter(models / "adapter")
  zero = peft_format.PeftAdapter(dict(source.config), {p: peft_format.LoraPair(pair.a_ri, np.zeros_like(pair.b_or))
                                                       for p, pair in source.modules.items()}, path=None)
  for null_config in (config, _config(models, loss="delta", guard=False, cache_dir=str(tmp_path / "cache"))):
    null = refine_adapter(models / "source", zero, models / "target", None, null_config, progress=False)
    assert all(not np.any(pair.b_or) for pair in null.adapter.modules.values())  # the null control is the base
    assert np.allclose(null.report["losses"], 0.0)
