"""Hub model ids for --model: resolved offline-first through huggingface_hub's local cache."""
import os

import pytest
import torch

import llmcore
from llmcore import hub
from llmcore.cli import main
from llmcore.models import from_pretrained

from tokenizer_refs import minilm_dir

hub_constants = pytest.importorskip("huggingface_hub.constants")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache, and no network (as on this machine): only the cache is searched."""
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_model(cache, repo_id: str, src: str) -> str:
    """Lays out ``src``'s files as the Hub cache holds a downloaded snapshot of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        os.symlink(os.path.join(src, name), snap / name)
    return str(snap)


def test_local_paths_pass_through(tmp_path):
    assert hub.checkpoint_folder(str(tmp_path)) == str(tmp_path)
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    assert hub.checkpoint_folder(str(f)) == str(f)  # a file is the caller's to judge
    with pytest.raises(FileNotFoundError, match=r"model '/no/such/folder': no such file or folder"):
        hub.checkpoint_folder("/no/such/folder")


@pytest.mark.parametrize("name,is_id", [("bert-base-uncased", True), ("org/model", True), ("a/b/c", False),
                                        ("./model", False), ("~/model", False), ("/abs", False), ("", False)])
def test_repo_id_shape(name, is_id):
    assert hub.looks_like_repo_id(name) is is_id


def test_a_missing_hub_id_fails_at_once_and_says_why(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"model 'org/missing': no such file or folder.*no network"):
        from_pretrained("org/missing")
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'org/missing': no such file or folder"):
        llmcore.Tokenizer.from_pretrained("org/missing")


def test_cached_hub_id_loads_the_same_model_and_tokenizer(offline_cache):
    src = minilm_dir()
    snap = cache_model(offline_cache, "sentence-transformers/all-MiniLM-L6-v2", src)
    assert hub.checkpoint_folder("sentence-transformers/all-MiniLM-L6-v2") == snap
    texts = ["A gripping, funny film.", "dull"]
    by_id = llmcore.Tokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").encode_batch(texts)
    by_path = llmcore.Tokenizer.from_pretrained(src).encode_batch(texts)
    assert by_id.input_ids.tolist() == by_path.input_ids.tolist()
    torch.manual_seed(0)
    a = from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)
    torch.manual_seed(0)
    b = from_pretrained(src, num_labels=2)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_cli_names_the_model_it_could_not_fetch(offline_cache, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    assert main(["finetune", "--data", str(data), "--model", "org/missing", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "llmcore finetune: error: model 'org/missing': no such file or folder" in err and "no network" in err
    assert main(["prepare", "--data", str(data), "--model", "org/missing", "--max-length", "32",
                 "--output-dir", str(tmp_path / "p")]) == 2
    assert "tokenizer 'org/missing': no such file or folder" in capsys.readouterr().err


def test_reachable_follows_hf_endpoint_and_hf_hub_offline(monkeypatch):
    """huggingface_hub's HF_ENDPOINT (a mirror) was ignored: the probe asked huggingface.co, and a reachable mirror
    was taken for no network (found by a probe); HF_HUB_OFFLINE cost a 3 s probe per call."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable(timeout=2.0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        t = time.perf_counter()
        assert not hub.reachable(timeout=2.0) and time.perf_counter() - t < 0.5
    finally:
        server.close()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub.reachable(timeout=2.0)  # (the port closed)
    monkeypatch.setenv("HF_ENDPOINT", "http://[::1")  # (no URL: not reachable, no ValueError out of it)
    assert not hub.reachable(timeout=2.0)
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # (huggingface_hub takes it as HF_HUB_OFFLINE)
    assert not hub.reachable(timeout=2.0)
