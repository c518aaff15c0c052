r"""Worked example: a PyTorch PEFT LoRA → another base model → flax.nnx LoRALinear layers → Orbax.

  python examples/flax_nnx_transfer.py [--workdir DIR]

Needs no downloads: it builds two tiny random Hugging Face models with transformers
(a 3-layer Llama, hidden 64, as the source; a 4-layer Qwen2, hidden 80, as the target)
and a PEFT LoRA on the source (rsLoRA, rank 4, rank 6 on q_proj), then

  1. reads the PEFT adapter and converts it to a flax.nnx LoRA tree (scaling folded into lora_b),
  2. transfers that tree to the target with the pytree API (base weights as in-memory mappings),
  3. loads it into flax.nnx.LoRALinear layers holding the target's base weights and runs them,
     checking every layer against the same adapter run by PEFT on the torch target model,
  4. checkpoints the LoRA tree with Orbax, restores it into the model's own LoRA state, and
  5. converts it back to a PEFT adapter, byte for byte the one the CLI would write.

Runs in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

import crosslora_jax
from crosslora_jax.formats import flax_bridge, orbax_io
from crosslora_jax.core import pytree_api

# Where each HF module lives in our nnx model: model.layers.3.self_attn.q_proj -> layers/3/attn/q_proj.
KEY_MAP = flax_bridge.key_template(
    ("model.layers.{layer}.self_attn.{name}", "layers/{layer}/attn/{name}"),
    ("model.layers.{layer}.mlp.{name}", "layers/{layer}/mlp/{name}"),
)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def build_hf_models(workdir: pathlib.Path) -> None:
  """Tiny random source/target models and a PEFT LoRA on the source, saved as HF/PEFT folders."""
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoConfig, AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  hf_logging.disable_progress_bar()
  shapes = {
      "source": ("llama", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2)),
      "target": ("qwen2", dict(hidden_size=80, intermediate_size=128, num_hidden_layers=4, num_attention_heads=5,
                               num_key_value_heads=1)),
  }
  models = {}
  for seed, (name, (model_type, sizes)) in enumerate(shapes.items()):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=128, max_position_embeddings=128, **sizes)
    models[name] = AutoModelForCausalLM.from_config(config).eval()
    models[name].save_pretrained(workdir / name)
  lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 6}, lora_dropout=0.0,
                    target_modules=list(ATTN + MLP))
  peft_model = get_peft_model(models["source"], lora)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # a trained-looking adapter: lora_B is not zero
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
  peft_model.save_pretrained(workdir / "adapter")


def load_base(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
  """Base weights as a plain mapping HF key -> numpy array, plus config.json."""
  return load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


class Group(nnx.Module):
  """The LoRALinear layers of one block (attention or MLP), named like the HF modules."""

  def __init__(self, prefix: str, names, weights, ranks, *, rngs: nnx.Rngs):
    for name in names:
      out_dim, in_dim = weights[f"{prefix}.{name}.weight"].shape
      setattr(self, name, nnx.LoRALinear(in_dim, out_dim, lora_rank=ranks[f"{prefix}.{name}"],
                                         use_bias=f"{prefix}.{name}.bias" in weights, rngs=rngs))


class Block(nnx.Module):
  def __init__(self, layer: int, weights, ranks, *, rngs: nnx.Rngs):
    self.attn = Group(f"model.layers.{layer}.self_attn", ATTN, weights, ranks, rngs=rngs)
    self.mlp = Group(f"model.layers.{layer}.mlp", MLP, weights, ranks, rngs=rngs)


class TargetLoraLayers(nnx.Module):
  """Every adapted linear layer of the target, as nnx.LoRALinear: layers/<i>/{attn,mlp}/<name>."""

  def __init__(self, num_layers: int, weights, ranks, *, rngs: nnx.Rngs):
    self.layers = nnx.List([Block(i, weights, ranks, rngs=rngs) for i in range(num_layers)])


def base_params(weights: dict[str, np.ndarray], module_paths) -> dict:
  """The target's base kernels (Flax orientation, (in, out)) and biases at our tree paths."""
  tree: dict = {}
  for path in module_paths:
    node = tree
    for key in KEY_MAP.to_tree(path):
      node = node.setdefault(key, {})
    node["kernel"] = flax_bridge.to_flax_orientation(weights[path + ".weight"])
    if path + ".bias" in weights:
      node["bias"] = weights[path + ".bias"]
  return tree


@nnx.jit
def apply(layer: nnx.LoRALinear, x: jax.Array) -> jax.Array:
  return layer(x)  # x @ kernel + bias + x @ lora_a @ lora_b


def run_and_check(model: TargetLoraLayers, workdir: pathlib.Path, adapter_folder: pathlib.Path) -> float:
  """Runs every nnx layer and the same module of the torch target with PEFT; returns the worst difference."""
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  torch_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "target"),
                                          str(adapter_folder)).eval()
  rng = np.random.default_rng(0)
  worst = 0.0
  for i, block in enumerate(model.layers):
    for group, hf_group, names in ((block.attn, "self_attn", ATTN), (block.mlp, "mlp", MLP)):
      for name in names:
        layer = getattr(group, name)
        x = rng.standard_normal((2, layer.in_features)).astype(np.float32)
        y = np.asarray(apply(layer, jnp.asarray(x)))
        with torch.no_grad():
          y_torch = torch_model.get_submodule(f"base_model.model.model.layers.{i}.{hf_group}.{name}")(
              torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(y - y_torch).max() / np.abs(y_torch).max()))
  return worst


def main(workdir: pathlib.Path) -> None:
  build_hf_models(workdir)

  # 1. PEFT adapter -> flax.nnx LoRA tree (lora_a = Aᵀ, lora_b = scaling · Bᵀ; meta keeps the way back).
  adapter = crosslora_jax.read_adapter(workdir / "adapter")
  source_tree = flax_bridge.to_nnx(adapter, key_map=KEY_MAP)

  # 2. Transfer the tree to the target; base weights are plain mappings here (or LazyWeights, or folders).
  (src, src_config), (tgt, tgt_config) = load_base(workdir / "source"), load_base(workdir / "target")
  result = pytree_api.transfer(src, tgt, source_tree, source_config=src_config, target_config=tgt_config,
                               key_map=KEY_MAP, config=crosslora_jax.TransferConfig(rank=32))
  print(result.report.text())

  # 3. nnx.LoRALinear layers with the target's base weights and the transferred LoRA. Building the
  #    model abstractly (nnx.eval_shape) skips the random initializers: every value comes from nnx.update.
  ranks = {p: result.adapter.rank(p) for p in result.adapter.modules}
  model = nnx.eval_shape(lambda: TargetLoraLayers(tgt_config["num_hidden_layers"], tgt, ranks, rngs=nnx.Rngs(0)))
  nnx.update(model, base_params(tgt, result.adapter.modules), result.lora.params)
  crosslora_jax.save_adapter(result.adapter, workdir / "transferred_peft")
  worst = run_and_check(model, workdir, workdir / "transferred_peft")
  print(f"nnx.LoRALinear vs PEFT on the torch target, {len(ranks)} layers: worst relative difference {worst:.1e}")
  assert worst < 1e-5

  # 4. Orbax: save the LoRA tree, restore it straight into the shape of the model's own LoRA state.
  orbax_io.save(workdir / "lora_orbax", result.lora)
  restored = orbax_io.restore(workdir / "lora_orbax", like=nnx.state(model, nnx.LoRAParam))
  nnx.update(model, restored.params)
  same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored.params, result.lora.params))
  print(f"Orbax checkpoint {workdir / 'lora_orbax'}: restored tree identical: {same}")
  assert same

  # 5. Back to PEFT: exactly the adapter the CLI writes for these inputs.
  back = flax_bridge.from_nnx(model, restored.meta)
  exact = all(np.array_equal(back.modules[p].a_ri, x.a_ri) and np.array_equal(back.modules[p].b_or, x.b_or)
              for p, x in result.adapter.modules.items())
  print(f"nnx -> PEFT round trip exact: {exact}")
  assert exact


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", type=pathlib.Path, default=None, help="Keep the files here (default: a temp dir).")
  args = parser.parse_args()
  if args.workdir is not None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    main(args.workdir)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      main(pathlib.Path(tmp))
