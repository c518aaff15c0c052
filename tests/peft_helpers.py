"""Loading a transferred adapter with the real transformers + peft, catching every warning."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.records: list[str] = []

  def emit(self, record):
    self.records.append(record.getMessage())


@contextlib.contextmanager
def captured_warnings():
  """Yields a list that fills with every Python warning and transformers/peft log warning."""
  handler = _Collect()
  loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
  for lg in loggers:
    lg.addHandler(handler)
  out: list[str] = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      yield out
    finally:
      for lg in loggers:
        lg.removeHandler(handler)
  out.extend(str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning)))
  out.extend(handler.records)


def load_with_adapter(model_dir, adapter_dir):
  """(base model, peft model, warnings raised while loading the adapter)."""
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with captured_warnings() as caught:
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  return model, caught


def logits(model, vocab: int = 128, seed: int = 0) -> torch.Tensor:
  ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
  with torch.no_grad():
    return model(input_ids=ids).logits.float()


def base_logits(peft_model) -> torch.Tensor:
  with peft_model.disable_adapter():
    return logits(peft_model)
