"""Models by name: a Hugging Face repo id resolves from a local hub cache laid out as huggingface_hub lays it out
(refs/<branch> -> commit, snapshots/<commit>/ symlinks into blobs/), for LLM, `qwen35 info` and `qwen35 serve`;
what the cache lacks gives a clear error offline, without huggingface_hub, or when the download fails."""

import builtins
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwen35 import LLM, SamplingParams
from qwen35.cli import main
from qwen35.demo import DEMO_DIR
from qwen35.hub import HubError, hub_cache, resolve_model

REPO = "Qwen/Qwen3.5-0.8B"
MAIN, OTHER = "a" * 40, "b" * 40  # commits of the main branch and of a "dev" branch


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, files=None, ref: str | None = "main"):
    """Put source's files into cache as huggingface_hub does: content in blobs/, symlinks in snapshots/<commit>/."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        if files is not None and f.name not in files:
            continue
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A hub cache holding the demo model as REPO at main, with HF_HUB_CACHE pointing at it and offline mode on."""
    root = tmp_path / "hub"
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(root, REPO, MAIN, DEMO_DIR)
    return root


def test_repo_id_resolves_to_the_main_snapshot(cache):
    path = resolve_model(REPO)
    assert path == cache / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / MAIN
    assert (path / "model.safetensors").is_symlink() and (path / "config.json").is_file()


def test_revision_by_branch_and_by_commit(cache):
    add_snapshot(cache, REPO, OTHER, DEMO_DIR, ref="dev")
    assert resolve_model(REPO, revision="dev").name == OTHER
    assert resolve_model(REPO, revision=OTHER).name == OTHER
    assert resolve_model(REPO, revision=MAIN).name == MAIN
    with pytest.raises(HubError, match=r"Qwen/Qwen3.5-0.8B \(revision v9\): not in the local Hugging Face cache"):
        resolve_model(REPO, revision="v9")


def test_hf_home_and_default_cache(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    add_snapshot(hub_cache(), REPO, MAIN, DEMO_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert resolve_model(REPO) == tmp_path / "hf" / "hub" / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / MAIN
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))  # the legacy name beats HF_HOME...
    assert hub_cache() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))  # ...and HF_HUB_CACHE beats both
    assert hub_cache() == tmp_path / "new"
    monkeypatch.delenv("HF_HOME")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"


def test_local_directory_wins_and_other_names_pass_through(cache, tmp_path, monkeypatch):
    local = tmp_path / "Qwen" / "Qwen3.5-0.8B"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)  # a directory of that name wins over the cache
    assert resolve_model("no/such/dir") == Path("no/such/dir")  # not a repo id: the loader reports it


def test_missing_model_offline_is_a_clear_error(cache):
    with pytest.raises(HubError) as e:
        resolve_model("Qwen/Qwen3.5-9B")
    assert str(e.value).startswith(f"Qwen/Qwen3.5-9B: not in the local Hugging Face cache at {cache}, and offline "
                                   "mode is on (HF_HUB_OFFLINE)")


def test_incomplete_snapshot_names_what_is_missing(cache):
    add_snapshot(cache, "Qwen/partial", MAIN, DEMO_DIR, files={"tokenizer.json"})
    with pytest.raises(HubError, match=r"lacks config\.json, weights \(\*\.safetensors\), and offline mode is on"):
        resolve_model("Qwen/partial")


def test_missing_model_online_without_huggingface_hub(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(HubError, match=r"Qwen/Qwen3.5-9B: not in the local Hugging Face cache .* huggingface_hub is "
                                       r"not installed to download it; `pip install huggingface_hub`"):
        resolve_model("Qwen/Qwen3.5-9B")


def test_download_goes_through_huggingface_hub_and_failures_are_one_line(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fetch(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        if repo_id == "Qwen/unreachable":
            raise OSError("Connection refused\nmore detail")
        return str(add_snapshot(cache, repo_id, OTHER, DEMO_DIR))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    assert resolve_model("Qwen/fetched").name == OTHER
    assert calls[0][:2] == ("Qwen/fetched", None) and "*.safetensors" in calls[0][2]
    assert resolve_model("Qwen/fetched") and len(calls) == 1  # now it is cached
    with pytest.raises(HubError) as e:
        resolve_model("Qwen/unreachable", revision="dev")
    assert str(e.value).startswith(f"Qwen/unreachable: not in the local Hugging Face cache ({cache}) and could not be "
                                   "downloaded from the Hugging Face hub at revision 'dev' (OSError: Connection "
                                   "refused); check the name")


def test_llm_loads_a_repo_id_and_generates(cache):
    llm = LLM(REPO, dtype="float32", max_model_len=128, max_num_seqs=2)
    assert llm.model_path == cache / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / MAIN
    assert llm.model_name == REPO
    by_name = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    direct = LLM(DEMO_DIR, dtype="float32", max_model_len=128, max_num_seqs=2)
    assert direct.model_name == "demo"
    assert by_name.token_ids == direct.generate(["def add(a, b):"], SamplingParams(max_tokens=8, temperature=0)
                                                )[0].outputs[0].token_ids
    assert len(by_name.token_ids) == 8


def test_info_takes_a_repo_id(cache, capsys):
    assert main(["info", REPO]) == 0
    by_name = capsys.readouterr().out
    assert main(["info", str(DEMO_DIR)]) == 0
    assert by_name.split("\n", 1)[1] == capsys.readouterr().out.split("\n", 1)[1]  # same figures, other title
    assert by_name.startswith(f"{REPO} (")
    assert main(["info", "Qwen/Qwen3.5-9B"]) == 2
    assert "qwen35 info: error: Qwen/Qwen3.5-9B: not in the local Hugging Face cache" in capsys.readouterr().err


def test_serve_a_repo_id_from_the_cache(cache, tmp_path):
    """`qwen35 serve` with a repo id: loads the cached snapshot and /v1/models names the repo id."""
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", REPO, "--port", "0",  # as `vllm serve REPO`
                             "--max-model-len", "128", "--max-num-seqs", "2"], stdout=log, stderr=log, env=env)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            m = re.search(r"Uvicorn running on (http://\S+)", (tmp_path / "serve.log").read_text())
            url = m and m[1]
        assert url, f"server did not start: {(tmp_path / 'serve.log').read_text()[-2000:]}"
        while True:  # uvicorn logs the address just before it listens
            try:
                models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert [m["id"] for m in models] == [REPO]
        assert models[0]["root"] == str(cache / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / MAIN)
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": REPO, "prompt": "def", "max_tokens": 4, "temperature": 0}).json()
        assert reply["model"] == REPO and reply["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_loading_progress_bar_only_for_large_checkpoints_on_a_terminal(monkeypatch, capsys):
    from qwen35.models import loader

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    loader.load_model(DEMO_DIR, dtype="float32")  # 14 MB: below the threshold, no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 1 << 20)
    loader.load_model(DEMO_DIR, dtype="float32")
    err = capsys.readouterr().err
    size = (DEMO_DIR / "model.safetensors").stat().st_size / (1 << 30)
    assert re.search(r"\rLoading weights \[#{30}\] 100\.0% (\d\.\d\d)/\1 GiB \d+s  \n$", err), err
    assert abs(float(re.search(r"/(\d\.\d\d) GiB", err)[1]) - size) < 0.01
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # piped or captured: never a bar
    loader.load_model(DEMO_DIR, dtype="float32")
    assert capsys.readouterr().err == ""
