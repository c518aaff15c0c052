"""A Hugging Face Hub cache built in a temporary folder, laid out as huggingface_hub lays it out.

``<cache>/models--owner--name/`` holds ``blobs/<etag>`` (the file bytes, named by
the git blob sha1, or by the sha256 for LFS files such as safetensors),
``snapshots/<commit>/<path>`` (relative symlinks into ``blobs``), ``refs/<name>``
(the commit hash, no newline) and ``trees/<commit>.json`` (huggingface_hub's cached
tree listing, from which it tells an incomplete snapshot). See huggingface_hub's
``file_download.py`` (``_create_symlink``, ``_cache_commit_hash_for_specific_revision``)
and ``_tree_cache.py``. The tests check the layout with huggingface_hub's own
``scan_cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

LFS_SUFFIXES = (".safetensors", ".bin")


def _git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: pathlib.Path, repo_id: str, folder: pathlib.Path, *, refs: tuple[str, ...] = ("main",),
                 tree_listing: bool = True, salt: str = "") -> str:
  """Puts every file of ``folder`` into ``cache`` as one commit of ``repo_id``; returns the commit hash."""
  storage = cache / ("models--" + repo_id.replace("/", "--"))
  files = sorted(p for p in folder.rglob("*") if p.is_file())
  digest = hashlib.sha1(salt.encode())
  entries = {}
  for file in files:
    data = file.read_bytes()
    rel = file.relative_to(folder).as_posix()
    lfs = file.suffix in LFS_SUFFIXES
    etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
    digest.update(rel.encode() + etag.encode())
    blob = storage / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    entry = {"size": len(data), "blob_id": _git_blob_sha1(data)}
    if lfs:
      entry.update(lfs_sha256=etag, lfs_size=len(data))
    entries[rel] = (entry, blob)
  commit = digest.hexdigest()
  for rel, (_, blob) in entries.items():
    pointer = storage / "snapshots" / commit / rel
    pointer.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, pointer.parent), pointer)
  for ref in refs:
    (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
  if tree_listing:
    (storage / "trees").mkdir(exist_ok=True)
    listing = {"format_version": 1, "files": {rel: e for rel, (e, _) in sorted(entries.items())}}
    (storage / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=1))
  return commit


def snapshot(cache: pathlib.Path, repo_id: str, commit: str) -> pathlib.Path:
  return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def tiny_folders(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """The tiny fixture models and a LoRA on the source, as plain folders: src (llama), tgt (qwen2), lora."""
  import fixtures
  src = fixtures.make_model("llama", root / "src", seed=0)
  fixtures.make_model("qwen2", root / "tgt", seed=1)
  fixtures.make_adapter(src, root / "lora", kind="llama", r=4, seed=1)
  return {"src": root / "src", "tgt": root / "tgt", "lora": root / "lora"}


def hub_env(monkeypatch, root: pathlib.Path) -> pathlib.Path:
  """Points huggingface_hub at an empty cache under ``root``, offline; returns the cache folder."""
  cache = root / "hf_home" / "hub"
  monkeypatch.setenv("HF_HOME", str(root / "hf_home"))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  return cache
