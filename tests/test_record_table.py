"""scripts/record_table.py: the per-seed table of a preset's runs against the paper's row."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_federated import small_config, synthetic

from spafl.federated import Simulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import record_table  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folders = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"seed{seed}")
        with Simulator(small_config(rounds=3, seed=seed), dataset=synthetic(n_train=200, n_test=50),
                       out_dir=out) as sim:
            sim.run()
        folders.append(out)
    return folders


def test_rows_and_table_come_from_the_histories(runs, tmp_path, capsys):
    out = tmp_path / "table"
    assert record_table.main([str(f) for f in reversed(runs)] + ["--out", str(out)]) == 0
    with open(out / "record.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == [0, 1]  # sorted by seed
    for row, folder in zip(rows, runs, strict=True):
        history = json.loads((folder / "history.json").read_text())["history"]
        acc = [h["acc_mean"] for h in history]
        assert int(row["rounds"]) == 3
        assert float(row["final_acc"]) == pytest.approx(acc[-1], abs=1e-5)
        assert float(row["last10_acc"]) == pytest.approx(np.mean(acc), abs=1e-5)  # fewer than 10 rounds: all
        assert int(row["best_round"]) == history[int(np.argmax(acc))]["round"]
        assert float(row["gbit_paper"]) == pytest.approx(history[-1]["comm_gbit_paper_total"], rel=1e-5)
        assert float(row["wall_s"]) == pytest.approx(sum(h["wall_s"] for h in history), rel=1e-4)
    text = (out / "record.md").read_text()
    assert text == capsys.readouterr().out
    finals = [float(r["final_acc"]) for r in rows]
    assert f"{np.mean(finals):.2f} +- {np.std(finals):.2f}" in text
    assert "89.21 +- 0.25" in text and "Over 2 runs" in text


def test_a_folder_without_history_is_refused(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        record_table.main([str(runs[0]), str(tmp_path), "--out", str(tmp_path / "t")])
    assert f"no history.json in: {tmp_path}" in capsys.readouterr().err
