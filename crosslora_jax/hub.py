"""Hub ids as well as folders: ``owner/name[@revision]`` resolved through the Hugging Face cache.

Wherever a base model or an adapter folder is expected, a Hugging Face Hub id may
be given instead (``Qwen/Qwen2.5-1.5B``, ``someone/my-lora@v2``, ``gpt2@<commit>``).
An existing local path always wins, as in ``from_pretrained``. A Hub id is looked
up offline first, in the local cache that ``huggingface_hub`` keeps (``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``); only when it is not there,
and neither ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set nor the caller
forbade it, are the files needed downloaded into that cache. The environment is
read at call time, not at import.

Every failure is one :class:`CrossLoraError` line that names the id and the fix:
an id that is neither a folder nor cached, an unknown revision (naming the cached
ones), a snapshot missing files (an interrupted download), a repository or
revision the Hub does not have, and a Hub that cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from crosslora_jax.errors import CrossLoraError

KINDS = ("model", "adapter")
# Files fetched on download (huggingface_hub allow_patterns): what crosslora_jax reads, nothing else
# (no pytorch_model.bin, GGUF or ONNX copies of the same weights).
DOWNLOAD_PATTERNS = {
    "model": ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
    "adapter": ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"],
}
_WHAT = {"model": "Hub model", "adapter": "Hub adapter"}
# owner/name, then an optional @revision: a branch, tag, commit or refs/pr/N. Legacy bare names (gpt2)
# are not taken: a mistyped local folder name would otherwise go to the network.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
_SNAPSHOT = re.compile(r"models--(?P<repo>.+)")


class HubFolder(NamedTuple):
  """Where a path or Hub id was found."""

  folder: pathlib.Path  # the folder to read (a snapshot folder for a Hub id)
  repo_id: str | None = None  # owner/name; None for a local folder
  revision: str | None = None  # as asked (default "main"); None for a local folder
  commit: str | None = None  # the snapshot's commit hash; None for a local folder


def cache_dir() -> pathlib.Path:
  """huggingface_hub's cache folder, from the environment as it is now."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    if os.environ.get(var):
      return pathlib.Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
  home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return pathlib.Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
  """Whether the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set true)."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
  """``"owner/name@rev"`` -> ``("owner/name", "rev")``; None when ``text`` cannot be a Hub id.

  Anything that reads as a path (absolute, ``./``, ``~``, no or more than one ``/``,
  ``--`` or ``..`` in the name) is not a Hub id.
  """
  match = _HUB_ID.fullmatch(text)
  if match is None:
    return None
  repo = match.group("repo")
  if "--" in repo or ".." in repo or repo.endswith(".") or len(repo) > 96:
    return None
  return repo, match.group("revision")


def is_hub_id(text: str | os.PathLike[str]) -> bool:
  """Whether :func:`resolve` takes ``text`` as a Hub id (it names no existing path and reads as one)."""
  text = os.fspath(text)
  path = pathlib.Path(text)
  return not (path.exists() or path.is_symlink()) and parse_hub_id(text) is not None


def short_name(text: str | os.PathLike[str]) -> str:
  """A folder's name, or a Hub id's repository name without owner and revision (output subfolders)."""
  text = os.fspath(text)
  if is_hub_id(text):
    return parse_hub_id(text)[0].split("/")[1]
  return pathlib.Path(text).name


def repo_id_of(folder: str | os.PathLike[str]) -> str | None:
  """``owner/name`` for a snapshot folder of the Hub cache (``models--owner--name/snapshots/<commit>``)."""
  path = pathlib.Path(folder)
  if path.parent.name != "snapshots":
    return None
  match = _SNAPSHOT.fullmatch(path.parent.parent.name)
  return match.group("repo").replace("--", "/") if match else None


def resolve_folder(path_or_id: Any, *, kind: str = "model") -> Any:
  """The folder to read for a path or Hub id; anything else (loaded weights, an adapter object) passes through."""
  if isinstance(path_or_id, (str, os.PathLike)):
    return resolve(path_or_id, kind=kind).folder
  return path_or_id


def resolve(path_or_id: str | os.PathLike[str], *, kind: str = "model", allow_download: bool = True,
            progress: bool | None = None) -> HubFolder:
  """Finds ``path_or_id``: an existing path as it is, else a Hub id in the cache, else downloaded.

  A path that does not exist and cannot be a Hub id comes back unchanged, so that
  the reader of the folder reports it. ``progress`` (None: huggingface_hub's own
  setting) shows or hides the download bars.
  """
  if kind not in KINDS:
    raise ValueError(f"kind: one of {KINDS} expected, got {kind!r}")
  text = os.fspath(path_or_id)
  if not is_hub_id(text):
    return HubFolder(pathlib.Path(text))
  repo_id, revision = parse_hub_id(text)
  revision = revision or "main"
  found = _from_cache(repo_id, revision)
  missing = missing_files(found.folder, kind) if found is not None else []
  if found is None or missing:
    if offline() or not allow_download:
      raise CrossLoraError(_incomplete(text, found, missing) if found else _not_cached(text, repo_id, revision, kind))
    found = _download(text, repo_id, revision, kind, progress)  # fetches what is missing, keeps the rest
    missing = missing_files(found.folder, kind)
    if missing:
      raise CrossLoraError(_incomplete(text, found, missing))
  return found


def missing_files(folder: pathlib.Path, kind: str) -> list[str]:
  """Files a ``kind`` folder needs that are absent (a dangling cache symlink counts as absent)."""
  if kind == "adapter":
    missing = [] if (folder / "adapter_config.json").is_file() else ["adapter_config.json"]
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
      missing.append("adapter_model.safetensors")
    return missing
  missing = [] if (folder / "config.json").is_file() else ["config.json"]
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    try:
      shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    except (ValueError, AttributeError, OSError):
      return missing  # the checkpoint reader names a bad index precisely
    missing += [s for s in shards if not (folder / s).is_file()]
  elif not (folder / "model.safetensors").is_file() and not any(p.is_file() for p in folder.glob("*.safetensors")):
    missing.append("model.safetensors")
  return missing


def _repo_folder(repo_id: str) -> pathlib.Path:
  return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _from_cache(repo_id: str, revision: str) -> HubFolder | None:
  """The cached snapshot of ``repo_id`` at ``revision``, found by huggingface_hub offline; None if not cached.

  A snapshot that huggingface_hub knows to lack some of the repository's files is
  still returned: :func:`missing_files` decides whether it lacks what is read here.
  """
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError
  try:
    folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir()), local_files_only=True)
  except _incomplete_error_type() as e:
    folder = e.snapshot_path
  except LocalEntryNotFoundError:
    return None
  folder = pathlib.Path(folder)
  return HubFolder(folder, repo_id, revision, folder.name)


def _incomplete_error_type() -> type[BaseException]:
  """huggingface_hub's IncompleteSnapshotError where it has one (newer versions), else nothing to catch."""
  from huggingface_hub import errors
  return getattr(errors, "IncompleteSnapshotError", _NeverRaised)


class _NeverRaised(Exception):
  pass


def cached_revisions(repo_id: str) -> list[str]:
  """``name (commit[:7])`` for each ref, then each snapshot no ref points to, of a cached repo."""
  root = _repo_folder(repo_id)
  refs = {}
  if (root / "refs").is_dir():
    for ref in sorted(p for p in (root / "refs").rglob("*") if p.is_file()):
      with contextlib.suppress(OSError):
        refs[ref.relative_to(root / "refs").as_posix()] = ref.read_text().strip()
  commits = sorted(p.name for p in (root / "snapshots").iterdir() if p.is_dir()) if (root / "snapshots").is_dir() else []
  named = [f"{name} ({commit[:7]})" for name, commit in refs.items()]
  return named + [c for c in commits if c not in refs.values()]


def _not_cached(text: str, repo_id: str, revision: str, kind: str) -> str:
  why = "HF_HUB_OFFLINE is set" if offline() else "downloading is turned off"
  fix = ("unset HF_HUB_OFFLINE" if offline() else "allow downloading")
  fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision != "main" else "")
  if _repo_folder(repo_id).is_dir():
    cached = cached_revisions(repo_id)
    return (f"{text}: revision {revision!r} of {_WHAT[kind]} {repo_id} expected in the Hugging Face cache "
            f"{cache_dir()}, got only {', '.join(cached) or 'no complete revision'} ({why}). Pass one of those "
            f"after @, or fetch it with `{fetch}` ({fix} first).")
  return (f"{text}: a local folder or a {_WHAT[kind]} in the Hugging Face cache {cache_dir()} expected, got "
          f"neither ({why}). Fetch it once with `{fetch}` ({fix} first), point HF_HUB_CACHE or HF_HOME at the "
          "cache that holds it, or pass a folder.")


def _incomplete(text: str, found: HubFolder, missing: list[str]) -> str:
  partial = sorted(p.name for p in (_repo_folder(found.repo_id) / "blobs").glob("*.incomplete")) if found.repo_id else []
  left = f"; {len(partial)} unfinished download(s) in its blobs/ folder" if partial else ""
  fetch = f"hf download {found.repo_id}" + (f" --revision {found.revision}" if found.revision != "main" else "")
  return (f"{text}: a complete snapshot expected in the Hugging Face cache ({found.folder}), got one missing "
          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}{left}. Finish the download with "
          f"`{fetch}`{' (unset HF_HUB_OFFLINE first)' if offline() else ''}.")


def _download(text: str, repo_id: str, revision: str, kind: str, progress: bool | None) -> HubFolder:
  """Downloads the files ``kind`` needs into the cache; every Hub failure becomes one line."""
  from huggingface_hub import snapshot_download
  from huggingface_hub import errors
  from crosslora_jax import __version__
  try:
    with _download_bars(progress):
      folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir()),
                                 allow_patterns=DOWNLOAD_PATTERNS[kind], library_name="crosslora_jax",
                                 library_version=__version__)
  except errors.RevisionNotFoundError:
    raise CrossLoraError(f"{text}: revision {revision!r} of {_WHAT[kind]} {repo_id} expected on the Hub, got no "
                         "branch, tag or commit by that name. Check the revision after @.") from None
  except errors.RepositoryNotFoundError:  # also gated and private repositories without a token
    raise CrossLoraError(f"{text}: a local folder or a {_WHAT[kind]} expected, got neither (no such folder; the Hub "
                         "has no repository by that name that this token may read). Check the id, or log in "
                         "with `hf auth login` for a private or gated one.") from None
  except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:
    cause = e.__cause__ or e
    raise CrossLoraError(f"{text}: a local folder, a copy in the Hugging Face cache {cache_dir()} or a reachable "
                         f"Hub expected, got none (no such folder; not cached; {type(cause).__name__}: {_first_line(cause)}). Check the network, or set "
                         "HF_HUB_OFFLINE=1 and point HF_HUB_CACHE at a cache that holds it.") from None
  folder = pathlib.Path(folder)
  return HubFolder(folder, repo_id, revision, folder.name)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else "no message"


@contextlib.contextmanager
def _download_bars(progress: bool | None) -> Iterator[None]:
  """huggingface_hub's download bars shown or hidden for one call, then left as they were."""
  from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
  if progress is None:
    yield
    return
  was_disabled = are_progress_bars_disabled()
  (enable_progress_bars if progress else disable_progress_bars)()
  try:
    yield
  finally:
    (disable_progress_bars if was_disabled else enable_progress_bars)()


def hide_download_bars() -> None:
  """Turns off huggingface_hub's download bars for this process (``--noprogress``)."""
  from huggingface_hub.utils import disable_progress_bars
  disable_progress_bars()
