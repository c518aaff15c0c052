"""A JAX runtime for the causal LMs the transfer supports: load, score, sample, train LoRA.

>>> lm = load("path/to/model", adapter="path/to/peft-adapter")     # doctest: +SKIP
>>> lm.nll(ids)            # (B,) mean next-token NLL                 # doctest: +SKIP
>>> lm.generate([[1, 2, 3]], max_new_tokens=16)                       # doctest: +SKIP

Pure functions (``model.forward``, ``model.token_logprobs``) over a parameter
pytree carry the maths; :class:`LM` bundles a loaded model with jitted entry
points. Importing this package compiles nothing.
"""

from crosslora_jax.lm.config import LMConfig
from crosslora_jax.lm.lm import LM, load
from crosslora_jax.lm.lora import LoraParams, LoraSpec, init_lora, lora_from_peft, lora_to_peft
from crosslora_jax.lm.model import forward, init_cache, logits, token_logprobs
from crosslora_jax.lm.params import load_params
from crosslora_jax.lm.sample import generate
from crosslora_jax.lm.tokenizer import Tokenizer
from crosslora_jax.lm.train import TrainConfig, TrainResult, train_lora

__all__ = [
    "LM",
    "LMConfig",
    "LoraParams",
    "LoraSpec",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "forward",
    "generate",
    "init_cache",
    "init_lora",
    "load",
    "load_params",
    "logits",
    "lora_from_peft",
    "lora_to_peft",
    "token_logprobs",
    "train_lora",
]
