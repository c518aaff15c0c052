"""refine's vocabulary term (refine.vocab): candidates carried across tokenizers, the loss, the cache."""

import json

import numpy as np
import pytest

from crosslora_jax.refine import RefineConfig, refine_adapter
from crosslora_jax.refine.vocab import align_row


def test_align_row_carries_candidates_where_tokens_start_at_the_same_character():
  # Text "abcdef": teacher tokens "ab" "cd" "ef", student tokens "abc" "d" "ef".
  t_starts, t_live = np.array([0, 2, 4]), np.array([False, True, True])
  s_starts, s_live = np.array([0, 3, 4]), np.array([False, True, True])
  cand = np.array([[0, 0], [5, 6], [7, 9]])
  delta = np.array([[0, 0], [0.5, -0.25], [1.0, 2.0]], np.float32)
  mapping = np.array([-1, -1, -1, -1, -1, 50, -1, 70, -1])  # 6 and 9 (out of range) have no target token
  ids, target, mask = align_row(t_starts, t_live, cand, delta, s_starts, s_live, mapping)
  assert not mask[0].any() and not mask[1].any()  # student "d" starts at 3: no teacher token starts there
  np.testing.assert_array_equal(mask[2], [True, False])
  assert ids[2, 0] == 70 and target[2, 0] == pytest.approx(1.0) and target[2, 1] == 0.0


def test_log_softmax_at_many_candidates_matches_the_full_softmax():
  import jax
  import jax.numpy as jnp
  from crosslora_jax.lm import model
  from crosslora_jax.lm.config import LMConfig
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(37, 8)), jnp.float32)
  cand = jnp.asarray(rng.integers(0, 37, size=(2, 5, 4)), jnp.int32)
  cfg = LMConfig.__new__(LMConfig)
  object.__setattr__(cfg, "final_softcap", None)
  got = model.chunked_log_softmax_at(hidden, head, cand, cfg, vocab_chunk=10)
  full = jax.nn.log_softmax(jnp.einsum("bth,vh->btv", hidden, head), -1)
  np.testing.assert_allclose(got, jnp.take_along_axis(full, cand, -1), atol=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from refine_fixtures import make_refine_models
  return make_refine_models(tmp_path_factory.mktemp("refine-vocab"))


def _config(root, **overrides):
  base = dict(tokens=24 * 16, sample_tokens=16, steps=8, batch=4, lr=2e-2, eval_every=4, loss="delta", vocab_k=8,
              guard=False, cache_dir=str(root / "corpus-cache"))
  return RefineConfig(**{**base, **overrides})


def test_the_vocabulary_term_trains_on_carried_candidates_and_its_corpus_is_cached(models):
  first = refine_adapter(models / "source", models / "adapter", models / "target", None, _config(models), progress=False)
  tokens = first.report["tokens"]
  assert first.report["corpus"]["cache"] == "miss"
  assert 0 < tokens["positions_with_candidates"] <= tokens["learnable_tokens"]
  assert tokens["positions_with_candidates"] < tokens["carried_candidates"] <= 8 * tokens["positions_with_candidates"]
  losses = np.asarray(first.report["losses"])
  assert losses[-3:].mean() < losses[:3].mean()  # the training loss goes down
  again = refine_adapter(models / "source", models / "adapter", models / "target", None, _config(models), progress=False)
  assert again.report["corpus"]["cache"] == "hit"
  np.testing.assert_allclose(again.report["losses"], first.report["losses"], rtol=1e-5)
  # Without the term the loss differs (same corpus text, a separate cache entry without candidates).
  plain = refine_adapter(models / "source", models / "adapter", models / "target", None, _config(models, vocab_k=0),
                         progress=False)
  assert plain.report["corpus"]["cache"] == "miss" and "carried_candidates" not in plain.report["tokens"]
  assert not np.allclose(plain.report["losses"], first.report["losses"])


def test_a_corpus_entry_with_damaged_candidates_is_recomputed(models, tmp_path):
  config = _config(models, cache_dir=str(tmp_path / "cache"), steps=2, eval_every=2)
  refine_adapter(models / "source", models / "adapter", models / "target", None, config, progress=False)
  entries = [p for p in (tmp_path / "cache").rglob("*.json")]
  damaged = 0
  for entry in entries:
    payload = json.loads(entry.read_text())
    body = payload.get("payload", payload)
    if "cand_ids" in body:
      body["cand_ids"][0] = body["cand_ids"][0][:-1]
      entry.write_text(json.dumps(payload))
      damaged += 1
  assert damaged == 1
  again = refine_adapter(models / "source", models / "adapter", models / "target", None, config, progress=False)
  assert again.report["corpus"]["cache"] != "hit"


def test_vocab_k_needs_the_delta_loss_on_the_teachers_text():
  from crosslora_jax.errors import CrossLoraError
  with pytest.raises(CrossLoraError, match="vocab_k"):
    RefineConfig(loss="nll", vocab_k=4)
  with pytest.raises(CrossLoraError, match="vocab_k"):
    RefineConfig(vocab_k=-1)
