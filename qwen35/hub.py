"""Models by name: turns what a user passes as a model (`--model`, `LLM(model)`, `qwen35 info`) into a checkpoint
directory. A local directory is used as it is; a Hugging Face repo id (`owner/name`) is looked up in the local
Hugging Face cache, laid out as huggingface_hub lays it out, and downloaded through huggingface_hub (an optional
dependency: `pip install qwen35[hub]`) when it is not there and offline mode is off."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
# What loading and serving read: config, tokenizer, generation and preprocessor settings, chat template, weights.
ALLOW_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model"]
CONFIG_PATTERNS = ["config.json"]  # `qwen35 info` reads no more


class HubError(ValueError):
    """A model name that cannot be turned into a checkpoint directory; the message says why and what to do."""


def hub_cache() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else the legacy $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot directory of repo_id at revision (a branch or tag named in refs/, default "main", or a
    commit hash), or None when the cache does not hold it."""
    repo_dir = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    if COMMIT.fullmatch(rev):
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def missing_files(snapshot: Path, weights: bool = True) -> list[str]:
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    if weights and not any(snapshot.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    return missing


def download(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download  # optional: only needed to fetch what the cache lacks
    except ImportError:
        raise HubError(f"{repo_id}: not in the local Hugging Face cache ({hub_cache()}) and huggingface_hub is not "
                       "installed to download it; `pip install huggingface_hub` (or qwen35[hub]), or download the "
                       "checkpoint and pass its directory") from None
    try:
        patterns = ALLOW_PATTERNS if weights else CONFIG_PATTERNS
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, authentication, unknown repo or revision: one line, not a traceback
        why = type(e).__name__ + (": " + str(e).strip().splitlines()[0] if str(e).strip() else "")
        at = f" at revision {revision!r}" if revision else ""
        raise HubError(f"{repo_id}: not in the local Hugging Face cache ({hub_cache()}) and could not be downloaded "
                       f"from the Hugging Face hub{at} ({why}); check the name and the network, or pass a checkpoint "
                       f"directory (no local directory {repo_id} either)") from None


def resolve_model(name_or_path: str | Path, revision: str | None = None, weights: bool = True) -> Path:
    """The checkpoint directory for a local directory or a Hugging Face repo id (weights=False: config.json is
    all the caller reads, so only it is required and downloaded). A path that is neither an existing directory nor
    shaped like a repo id comes back unchanged, for the loader to report."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not is_repo_id(str(name_or_path)):
        return path
    repo_id = str(name_or_path)
    at = f" (revision {revision})" if revision else ""
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None and not missing_files(snapshot, weights):
        return snapshot
    if offline():
        where = (f"{snapshot} lacks {', '.join(missing_files(snapshot, weights))}" if snapshot is not None
                 else f"not in the local Hugging Face cache at {hub_cache()}")
        raise HubError(f"{repo_id}{at}: {where}, and offline mode is on (HF_HUB_OFFLINE); unset it to download, "
                       f"or pass a checkpoint directory (no local directory {repo_id} either)")
    snapshot = download(repo_id, revision, weights)
    if missing := missing_files(snapshot, weights):
        raise HubError(f"{repo_id}{at}: the downloaded snapshot {snapshot} lacks {', '.join(missing)}; is it a "
                       "Qwen3.5 checkpoint in safetensors?")
    return snapshot
