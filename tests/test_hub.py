"""Hub ids through a real Hugging Face cache layout built in a temporary folder (never ~/.cache)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import hub_cache
from conftest import ROOT
from crosslora_jax import CrossLoraError, hub
from crosslora_jax.formats.checkpoint import Checkpoint
from crosslora_jax.formats.peft_format import read_adapter
from peft_helpers import load_with_adapter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  return hub_cache.tiny_folders(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def cache(monkeypatch, tmp_path, folders):
  """tiny/llama (main), tiny/qwen2 (main and tag v1), someone/tiny-lora (main), offline."""
  cache = hub_cache.hub_env(monkeypatch, tmp_path)
  commits = {"tiny/llama": hub_cache.add_snapshot(cache, "tiny/llama", folders["src"]),
             "tiny/qwen2": hub_cache.add_snapshot(cache, "tiny/qwen2", folders["tgt"], refs=("main", "v1")),
             "someone/tiny-lora": hub_cache.add_snapshot(cache, "someone/tiny-lora", folders["lora"])}
  return cache, commits


def one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(CrossLoraError) as info:
    call(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_the_built_cache_is_what_huggingface_hub_reads(cache):
  from huggingface_hub import scan_cache_dir
  root, commits = cache
  info = scan_cache_dir(root)
  assert info.warnings == []
  repos = {r.repo_id: r for r in info.repos}
  assert sorted(repos) == ["someone/tiny-lora", "tiny/llama", "tiny/qwen2"]
  (revision,) = repos["tiny/qwen2"].revisions
  assert revision.commit_hash == commits["tiny/qwen2"] and sorted(revision.refs) == ["main", "v1"]
  assert {f.file_name for f in revision.files} >= {"config.json", "model.safetensors"}


def test_branch_tag_and_commit_resolve_to_the_snapshot(cache):
  root, commits = cache
  want = hub_cache.snapshot(root, "tiny/qwen2", commits["tiny/qwen2"])
  for text in ("tiny/qwen2", "tiny/qwen2@main", "tiny/qwen2@v1", f"tiny/qwen2@{commits['tiny/qwen2']}"):
    found = hub.resolve(text)
    assert found.folder == want and found.repo_id == "tiny/qwen2" and found.commit == commits["tiny/qwen2"]
  assert hub.resolve("tiny/qwen2@v1").revision == "v1"
  assert hub.resolve("someone/tiny-lora", kind="adapter").folder.name == commits["someone/tiny-lora"]


def test_checkpoint_and_adapter_named_by_their_hub_id(cache):
  ckpt = Checkpoint("tiny/qwen2@v1")
  assert ckpt.name == "tiny/qwen2" and ckpt.arch.model_type == "qwen2"
  adapter = read_adapter("someone/tiny-lora")
  assert adapter.name == "someone/tiny-lora" and adapter.modules


def test_a_local_folder_wins_over_a_hub_id(cache, folders, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(folders["src"], tmp_path / "tiny" / "qwen2")  # a local folder spelled like the Hub id
  found = hub.resolve("tiny/qwen2")
  assert found.repo_id is None and found.folder == hub.pathlib.Path("tiny/qwen2")
  assert Checkpoint("tiny/qwen2").arch.model_type == "llama"


@pytest.mark.parametrize("text", ["/no/such/folder", "./tiny/qwen2", "tiny/qwen2/sub", "plainname", "a--b/c", "~/x"])
def test_what_cannot_be_a_hub_id_stays_a_path(cache, text):
  assert not hub.is_hub_id(text)
  assert hub.resolve(text) == hub.HubFolder(hub.pathlib.Path(text))
  assert "model folder expected" in one_line_error(Checkpoint, text)


def test_missing_id_says_how_to_fetch_it(cache):
  message = one_line_error(hub.resolve, "tiny/nope")
  assert message.startswith("tiny/nope: a local folder or a Hub model in the Hugging Face cache")
  assert "`hf download tiny/nope`" in message and "HF_HUB_OFFLINE" in message and str(cache[0]) in message
  assert "Hub adapter" in one_line_error(read_adapter, "someone/nope")


def test_unknown_revision_names_the_cached_ones(cache):
  root, commits = cache
  message = one_line_error(hub.resolve, "tiny/qwen2@v9")
  assert message.startswith("tiny/qwen2@v9: revision 'v9' of Hub model tiny/qwen2")
  short = commits["tiny/qwen2"][:7]
  assert f"main ({short})" in message and f"v1 ({short})" in message
  assert "--revision v9" in message


def test_incomplete_snapshot_known_from_the_tree_listing(cache):
  root, commits = cache
  (hub_cache.snapshot(root, "tiny/llama", commits["tiny/llama"]) / "model.safetensors").unlink()
  message = one_line_error(hub.resolve, "tiny/llama")
  assert "a complete snapshot expected" in message and "model.safetensors" in message
  assert "`hf download tiny/llama`" in message


def test_files_not_read_here_may_be_missing(cache):
  root, commits = cache
  listing = root / "models--tiny--llama" / "trees" / f"{commits['tiny/llama']}.json"
  tree = json.loads(listing.read_text())
  tree["files"]["pytorch_model.bin"] = {"size": 10, "blob_id": "0" * 40}  # on the Hub, never downloaded
  listing.write_text(json.dumps(tree))
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError
  with pytest.raises(LocalEntryNotFoundError):  # huggingface_hub calls the snapshot incomplete...
    snapshot_download("tiny/llama", cache_dir=str(root), local_files_only=True)
  assert hub.resolve("tiny/llama").commit == commits["tiny/llama"]  # ...but it holds all that is read


def test_incomplete_snapshot_without_tree_listing(cache, folders, tmp_path):
  root, _ = cache
  commit = hub_cache.add_snapshot(root, "tiny/partial", folders["src"], tree_listing=False)
  blobs = root / "models--tiny--partial" / "blobs"
  weights = hub_cache.snapshot(root, "tiny/partial", commit) / "model.safetensors"
  blob = (weights.parent / os.readlink(weights)).resolve()
  blob.rename(blob.with_name(blob.name + ".incomplete"))  # an interrupted download: a dangling link
  message = one_line_error(hub.resolve, "tiny/partial")
  assert "missing model.safetensors; 1 unfinished download(s)" in message
  assert blobs.is_dir()


def test_incomplete_sharded_snapshot_names_the_shard(cache, tmp_path):
  import fixtures
  root, _ = cache
  fixtures.make_model("llama", tmp_path / "sharded", seed=0, max_shard_size="100KB")
  shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
  assert len(shards) > 1
  (tmp_path / "sharded" / shards[-1]).unlink()
  hub_cache.add_snapshot(root, "tiny/sharded", tmp_path / "sharded", tree_listing=False)
  assert shards[-1] in one_line_error(hub.resolve, "tiny/sharded")


def test_downloads_forbidden_by_the_caller(cache, monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE")
  assert not hub.offline()
  message = one_line_error(hub.resolve, "tiny/nope", allow_download=False)
  assert "downloading is turned off" in message


def run_cli(args, env_extra, cwd):
  env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
  for var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE"):
    env.pop(var, None)
  env.update(env_extra)
  return subprocess.run([sys.executable, "-m", "crosslora_jax.transfer", *map(str, args)], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=300)


def test_unreachable_hub_is_one_line(tmp_path):
  with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub"),
         "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
  r = run_cli(["--source_model", "tiny/nope", "--target_model", "tiny/nope2", "--adapter", "x/y",
               "--output", tmp_path / "out", "--no_cache"], env, tmp_path)
  assert r.returncode == 2, r.stderr
  (line,) = r.stderr.strip().splitlines()
  assert line.startswith("error: tiny/nope: a local folder, a copy in the Hugging Face cache")
  assert "ConnectError" in line and "HF_HUB_OFFLINE=1" in line
  assert not (tmp_path / "out").exists()


def test_cli_with_hub_ids(cache, tmp_path):
  root, commits = cache
  env = {"HF_HOME": os.environ["HF_HOME"], "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
  out = tmp_path / "out"
  before = sorted(root.rglob("*"))
  args = ["--source_model", "tiny/llama", "--target_model", "tiny/qwen2@v1", "--adapter", "someone/tiny-lora",
          "--output", out, "--rank", "16", "--report", tmp_path / "report.json", "--plot", tmp_path / "out.png",
          "--cache_dir", tmp_path / "subspaces", "--xla_cache_dir", tmp_path / "xla"]
  r = run_cli(args, env, tmp_path)
  assert r.returncode == 0, r.stderr
  assert "someone/tiny-lora: cross_lora tiny/llama -> tiny/qwen2" in r.stdout
  assert "decomposing" not in r.stderr  # stderr is no terminal: no progress bar unless --progress
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
  assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/qwen2"
  card = (out / "README.md").read_text()
  assert card.startswith("---\nbase_model: tiny/qwen2\n") and "[tiny/qwen2@v1]" in card
  assert 'from_pretrained("tiny/qwen2", revision="v1")' in card
  assert (tmp_path / "out.png").stat().st_size > 0
  _, caught = load_with_adapter(hub_cache.snapshot(root, "tiny/qwen2", commits["tiny/qwen2"]), out)
  assert caught == []
  first = (out / "README.md").read_bytes()
  r = run_cli(args + ["--overwrite"], env, tmp_path)
  assert r.returncode == 0, r.stderr
  assert (out / "README.md").read_bytes() == first  # no times or run-specific details in the card
  assert sorted(root.rglob("*")) == before  # offline: the cache is only read


def test_python_api_takes_hub_ids(cache, tmp_path):
  import crosslora_jax
  config = crosslora_jax.TransferConfig(rank=8, method="truncate_pad")
  result = crosslora_jax.transfer_adapter("tiny/llama", "tiny/qwen2@v1", "someone/tiny-lora", config)
  assert (result.report.adapter, result.report.source, result.report.target) == (
      "someone/tiny-lora", "tiny/llama", "tiny/qwen2")
  assert result.adapter.config["base_model_name_or_path"] == "tiny/qwen2"
  result.save(tmp_path / "saved")
  assert (tmp_path / "saved" / "README.md").read_text().startswith("---\nbase_model: tiny/qwen2\n")
