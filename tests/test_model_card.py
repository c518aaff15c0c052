"""The README.md model card: front matter as PEFT and the Hub read it, deterministic body, verified, peft interop."""

import dataclasses
import pathlib
import shutil

import pytest

import fixtures
from crosslora_jax import CrossLoraError, TransferConfig, read_adapter, transfer_adapter
from crosslora_jax.core.report import Report
from crosslora_jax.formats import adapter_io, model_card
from peft_helpers import captured_warnings, load_with_adapter


def entry(module, layer, **extra):
  return {"module": module, "target_layer": layer, "source_layer": layer, "energy_source": 0.8,
          "energy_target": 0.7, "norm_ratio": 0.5, "overlap": 0.25, "rank_used": 8, "seconds": 0.01,
          "relative_update_source": 0.1, "relative_update_target": 0.05, **extra}


def make_report(seconds=1.5, method="cross_lora", skipped=(), entries=None):
  entries = entries or [entry(m, l) for l in range(2) for m in ("q_proj", "v_proj")]
  config = dataclasses.asdict(TransferConfig(method=method, rank=8, cache_dir="/somewhere/cache"))
  return Report.build(adapter="someone/my-lora", source="org/source-base", target="org/target-base", config=config,
                      entries=entries, skipped=list(skipped), layer_map=[0, 1], seconds=seconds,
                      seconds_decompose=seconds / 2, output_dtype="bfloat16")


def test_front_matter_is_what_peft_and_the_hub_read():
  from huggingface_hub import ModelCard
  card = ModelCard(model_card.render(make_report(), base_model="org/target-base"))
  assert card.data.base_model == "org/target-base"
  assert card.data.library_name == "peft"
  assert card.data.pipeline_tag == "text-generation"
  assert {"lora", "transformers", "base_model:adapter:org/target-base"} <= set(card.data.tags)


def test_body_names_inputs_method_options_and_the_caveat():
  text = model_card.render(make_report(), base_model="org/target-base", target_model="org/target-base@v2")
  for want in ("[someone/my-lora](https://huggingface.co/someone/my-lora)",
               "[org/source-base](https://huggingface.co/org/source-base)",
               "[org/target-base@v2](https://huggingface.co/org/target-base/tree/v2)",
               "| method | `cross_lora` |", "rank 8", "dtype bfloat16", "calibrate_norm off",
               "4 weights: q_proj ×2, v_proj ×2", "| subspace overlap (mean) | 0.250 |",
               "## Quality: measured, not assumed", model_card.QUALITY_CAVEAT,
               'from_pretrained("org/target-base", revision="v2")', "### Framework versions"):
    assert want in text, want
  assert "/somewhere/cache" not in text  # execution knobs are not options of the result


def test_local_folders_are_code_not_links():
  text = model_card.render(make_report(), base_model="/data/target", source_adapter="/data/my-lora",
                           source_model="/data/source", target_model="/data/target")
  assert "`/data/my-lora`" in text and "huggingface.co//data" not in text


def test_same_bytes_for_the_same_transfer_whatever_it_took():
  a = model_card.render(make_report(seconds=1.5), base_model="org/target-base")
  b = model_card.render(make_report(seconds=99.0), base_model="org/target-base")
  assert a == b


def test_changes_when_the_transfer_does():
  base = model_card.render(make_report(), base_model="org/target-base")
  skipped = [{"source_key": "model.layers.2.mlp.gate_proj", "module": "gate_proj", "source_layer": 2,
              "reason": "target qwen2 has no gate_proj"}]
  other = model_card.render(make_report(skipped=skipped), base_model="org/target-base")
  assert other != base
  assert "- 1: target qwen2 has no gate_proj (`model.layers.2.mlp.gate_proj`)" in other
  guard = [entry("q_proj", 0, guard="skipped"), entry("q_proj", 1, guard="kept")]
  assert "(1 zeroed by the anchored guard)" in model_card.render(make_report(method="anchored", entries=guard),
                                                                  base_model="org/target-base")


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
  root = tmp_path_factory.mktemp("card")
  src = fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_model("llama", root / "tgt", seed=3)
  fixtures.make_adapter(src, root / "lora", kind="llama", r=4, seed=1)
  result = transfer_adapter(root / "src", root / "tgt", root / "lora", TransferConfig(method="copy"))
  result.save(root / "out")
  return root, result


def test_save_writes_and_verifies_the_card(transferred, tmp_path):
  root, result = transferred
  card = (root / "out" / "README.md").read_text()
  assert card == model_card.render(result.report, base_model=result.adapter.config["base_model_name_or_path"])
  with pytest.raises(CrossLoraError, match="README.md: the rendered model card expected, got different bytes"):
    adapter_io.verify_adapter_folder(root / "out", result.adapter, None, readme=card + "changed")
  (tmp_path / "empty").mkdir()
  assert "the model card expected" in model_card.check_written(tmp_path / "empty", card)[0]


def test_peft_loads_it_and_keeps_the_card_on_save(transferred, tmp_path):
  root, _ = transferred
  model, caught = load_with_adapter(root / "tgt", root / "out")
  assert caught == []
  ours = (root / "out" / "README.md").read_text()
  shutil.copytree(root / "out", tmp_path / "resaved")  # save_pretrained over it updates the card in place
  with captured_warnings() as caught:
    model.save_pretrained(tmp_path / "resaved")
  assert caught == []
  resaved = (tmp_path / "resaved" / "README.md").read_text()
  import peft
  assert "## Quality: measured, not assumed" in resaved and f"- PEFT {peft.__version__}" in resaved
  assert all(line in resaved.splitlines() for line in ours.split("---\n", 2)[2].splitlines())  # our body kept
  read_adapter(tmp_path / "resaved")  # and it is still an adapter crosslora_jax reads


def refine_section(shipped="refined", cache="miss", seconds=12.0):
  """A refine report of the shape refine.pipeline writes."""
  from crosslora_jax.refine import RefineConfig
  config = {k: v for k, v in dataclasses.asdict(RefineConfig(steps=4, eval_every=2)).items() if k != "cache_dir"}
  return {"corpus": {"cache": cache, "samples": 64, "teacher_tokens": 6100}, "init": "projection", "rank": 16,
          "alpha": 32.0, "target_modules": ["q_proj"], "config": config, "losses": [2.0, 1.9, 1.8, 1.7],
          "tokens": {"selected_tokens": 1500, "learnable_tokens": 5000, "train_samples": 56, "heldout_samples": 8,
                     "student_tokens": 6000, "length": 112},
          "heldout": [{"step": 0, "agreement": 0.1}, {"step": 2, "agreement": 0.25}, {"step": 4, "agreement": 0.2}],
          "best_step": 2 if shipped == "refined" else 0, "shipped": shipped,
          "guard": "held-back agreement improved at step 2" if shipped == "refined" else "no evaluated step improved",
          "seconds": {"teacher": seconds, "train": seconds, "total": 2 * seconds}}


def test_the_card_says_what_the_refine_ran_what_it_checked_and_what_shipped():
  plain = model_card.render(make_report(), base_model="org/target-base")
  assert "## Refine by distillation" not in plain and "without data or training" in plain
  report = dataclasses.replace(make_report(), refine=refine_section())
  text = model_card.render(report, base_model="org/target-base")
  for want in ("## Refine by distillation", "then refined by distillation on text the source model wrote",
               "64 samples of up to 96 tokens", "r 16, alpha 32", "started from the projection",
               "4 steps x 4 samples at lr 0.001", "(1500 of 5000)", "`agreement` on 8 teacher samples",
               "step 0: 0.100, step 2: 0.250, step 4: 0.200", "| shipped | refined (held-back agreement improved"):
    assert want in text, want
  again = dataclasses.replace(make_report(), refine=refine_section(cache="hit", seconds=99.0))
  assert model_card.render(again, base_model="org/target-base") == text  # no cache status, no times
  held = dataclasses.replace(make_report(), refine=refine_section(shipped="initial"))
  held_text = model_card.render(held, base_model="org/target-base")
  assert "its held-back check kept the projection" in held_text and "| shipped | initial" in held_text


def test_results_links_are_absolute():
  import re
  text = model_card.render(dataclasses.replace(make_report(), refine=refine_section()), base_model="org/target-base")
  links = re.findall(r"\]\(([^)]+)\)", text)
  results = [link for link in links if link.endswith(("quality.md", "refine.md"))]
  assert len(results) == 2, links
  assert all(link.startswith(("https://", "file:///")) for link in results), results
  for link in results:
    if link.startswith("file://"):
      assert pathlib.Path(link[len("file://"):]).is_file()  # a path the user has
