"""benchmarks/host_time.py: its table, and --baseline (another checkout's package timed beside
this tree's)."""

import csv
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import host_time  # noqa: E402

pytestmark = pytest.mark.interpreter


def test_host_time_with_a_baseline_pairs_every_side_with_it(tmp_path, capsys):
    tree = tmp_path / "tree"
    for name in ("spafl", "kernels"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "federated", "flower"))
    out = tmp_path / "out"
    args = ["--label", "t", "--out", str(out), "--reps", "2", "--min-sample-ms", "0", "--triton-batch", "4",
            "--baseline", str(tree)]
    assert host_time.main(args) == 0
    rows = {r["case"]: r for r in csv.DictReader((out / "t.csv").open())}
    assert set(rows) == {"triton_fwd", "triton_fwd_bwd", "base_triton_fwd", "base_triton_fwd_bwd", "trivial_launch",
                         "cpu_spafl_fwd", "cpu_base_spafl_fwd", "cpu_linear_fwd", "cpu_spafl_fwd_bwd",
                         "cpu_base_spafl_fwd_bwd", "cpu_linear_fwd_bwd"}
    for case in ("triton_fwd", "triton_fwd_bwd", "cpu_spafl_fwd", "cpu_spafl_fwd_bwd"):
        assert float(rows[case]["vs_baseline"]) > 0
    assert rows["base_triton_fwd"]["vs_baseline"] == "" and rows["base_triton_fwd_bwd"]["launches"] == "5"
    assert "x baseline" in (out / "t.md").read_text()
    with pytest.raises(SystemExit):
        host_time.main(args)  # no file is overwritten
    assert "exists; choose another --label" in capsys.readouterr().err


def test_host_time_pieces_writes_its_table_once(tmp_path, capsys):
    import host_time_pieces

    args = ["--label", "p", "--out", str(tmp_path), "--reps", "2", "--min-sample-ms", "0"]
    assert host_time_pieces.main(args) == 0
    rows = [line for line in (tmp_path / "p.md").read_text().splitlines() if line.startswith("| ")][1:]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert names[0] == "layer forward" and names[-1] == "nn.Linear(64, 10) forward" and len(names) == 14
    assert "prepared row mask (the kept call's)" in names
    assert "floor: that Function, forward + backward with four gradients" in names
    assert rows[-1].endswith("| 1.00 |")  # (the yardstick, in its own units)
    with pytest.raises(SystemExit):
        host_time_pieces.main(args)  # no file is overwritten
    assert "exists; choose another --label" in capsys.readouterr().err
