"""`llmcore finetune` end to end on a slice of SST-2 with the real MiniLM checkpoint."""
import json
import os

import pytest

from llmcore.bench.data import data_dir
from llmcore.cli import main
from tokenizer_refs import minilm_dir


def _slice(src, dst, rows):
    with open(src, newline="", encoding="utf-8") as f:
        lines = f.read().split("\n")
    with open(dst, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[: rows + 1]) + "\n")


@pytest.mark.parametrize("pack", [True, False])
def test_finetune_cli_runs_and_saves(tmp_path, pack):
    try:
        root = data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    data = tmp_path / "sst2"
    data.mkdir()
    for split, rows in (("train", 96), ("validation", 32), ("test", 32)):
        _slice(os.path.join(root, "sst2", f"{split}.tsv"), data / f"{split}.tsv", rows)
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(data), "--model", minilm_dir(), "--output-dir", str(out),
            "--max-length", "64", "--max-steps", "4", "--per-device-train-batch-size", "16", "--warmup-steps", "1",
            "--logging-steps", "2", "--save-strategy", "no", "--eval-strategy", "no"] + ([] if pack else ["--no-pack"])
    assert main(argv) == 0
    with open(out / "final" / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    assert set(metrics) >= {"train", "validation", "test"} and metrics["train"]["global_step"] == 4
    assert 0.0 <= metrics["test"]["eval_accuracy"] <= 1.0
    from llmcore.models import from_pretrained

    assert from_pretrained(out / "final").newly_initialized == []


def test_finetune_cli_bad_data(tmp_path, capsys):
    assert main(["finetune", "--data", str(tmp_path / "missing"), "--model", minilm_dir(),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "llmcore finetune: error:" in capsys.readouterr().err
