"""Per-round wall time of the SpaFL authors' Fashion-MNIST code and of ``spafl train --preset
fmnist-lenet5``, on the same machine, with the same thread budget and number of rounds, in one CSV.

    python scripts/authors_side_by_side.py \\
        --authors-repo /work/.mirror/news-vt+SpaFL_NeruIPS_2024/repo --data-root ../shared/data \\
        --rounds 60 --csv side_by_side.csv --summary side_by_side.md

The authors' side. ``main/fmnist`` of ``--authors-repo`` (a git directory, bare or not, or a
checkout) is exported into a temporary folder outside this repository (never into it: their
code is not ours to commit), and its ``train.py`` runs there, unmodified, in a subprocess:

    python train.py --data_root ROOT --comm_rounds N --seed S \\
        --learning_rate 0.001 --th_coeff 0.002 --local_epoch 5 --log_root TMP/log --model_root TMP/checkpoint

(the settings of their ``main/fmnist/run_command.txt``; the log and checkpoint folders only
keep their files out of the way). Their code imports ``wandb`` and ``torchvision``, neither
usable here, so that subprocess alone gets ``scripts/authors_shims`` first on ``PYTHONPATH``: a
``wandb`` whose ``init``/``log`` do nothing, and a ``torchvision`` whose
``datasets.FashionMNIST`` reads the raw IDX files of ``ROOT/FashionMNIST/raw`` into ``.data``
(uint8 ``[n, 28, 28]``) and ``.targets`` (int64), as torchvision's does. The shims are data
plumbing: the model, the non-IID split, local training, aggregation and evaluation are the
authors' code as published. Per-round figures are read from their log file
(``TMP/log/<affix>/train_log.txt``, lines ``round: %d, avg_acc: %.3f, avg_density: %.3f,
spent: %.2f``) while it runs.

Our side. ``python -m spafl train --preset fmnist-lenet5 --rounds N --seed S --data-root ROOT
--out TMP/<label> --no-plot --no-progress [ARGS]`` for each ``--ours LABEL=ARGS`` configuration
(default one, ``spafl``, with no extra arguments; for instance ``--ours "spafl-2workers=--workers
2"`` once the CLI has that flag, a different thread budget that its label must state). Per-round
``wall_s``, ``acc_mean`` and ``density`` are read from the run's ``history.csv`` (written every
10 rounds and at the end).

Same budget: both run with ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to ``--threads``
(default 1), one process each, one after the other (two programs cannot alternate rounds), so
each side's drift over its run is reported (the median time of its last third of rounds over its
first third): the machine may be shared. What the times include differs in one way that matters:
the authors evaluate all 100 clients after every round, ours re-evaluates only the 10 sampled
clients (the others' cached results stand, since their models did not change). Their ``spent``
runs from the start of the round to its log line; our ``wall_s`` from the start of the round to
the end of its evaluation (checkpoints and history files are written outside it).

Outputs: ``--csv``, one row per round and side (columns ``COLUMNS``: side, round, seconds, acc
in %, density as the mean layer density, then the machine, versions, threads and the exact
command of that side), written as each round is read; ``--summary``, a Markdown summary: the
median per-round time of each side over the rounds both ran, the ratio, the drift, the accuracy
and density trajectories side by side, and the 500-round time of each side: measured when 500
rounds ran, else extrapolated from the last rounds and labelled so.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "authors_shims"
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import CsvSink, HelpFormatter, environment, timestamp  # noqa: E402

AUTHORS_SUBDIR = "main/fmnist"
# main/fmnist/run_command.txt: python train.py --learning_rate 0.001 --th_coeff 0.002 --local_epoch 5 --seed 1
AUTHORS_SETTINGS = ["--learning_rate", "0.001", "--th_coeff", "0.002", "--local_epoch", "5"]
AUTHORS_AFFIX = "side_by_side"
FULL_RUN = 500  # rounds of the paper's Fashion-MNIST run
COLUMNS = ("side", "round", "seconds", "acc", "density", "timestamp", "device", "torch", "python", "spafl", "threads",
           "authors_commit", "command")
LOG_LINE = re.compile(r"round: (?P<round>\d+), avg_acc: (?P<acc>[^,\s]+), avg_density: (?P<density>[^,\s]+), "
                      r"spent: (?P<seconds>[^,\s]+)")


# --- the authors' code ----------------------------------------------------------------------


def parse_authors_log(lines) -> list[dict]:
    """``[{round, seconds, acc, density}]`` from the authors' log lines (other lines ignored).
    Their log counts rounds from 0; ``round`` counts from 1, as ``spafl train``'s history."""
    rows = []
    for line in lines:
        m = LOG_LINE.search(line)
        if m:
            rows.append({"round": int(m["round"]) + 1, "seconds": float(m["seconds"]), "acc": float(m["acc"]),
                         "density": float(m["density"])})
    return rows


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def export_authors_code(repo: Path, dest: Path) -> tuple[Path, str]:
    """Copy ``main/fmnist`` of ``repo`` (a git directory or a checkout) into ``dest`` (a folder
    outside this repository); return ``(folder holding train.py, commit or "unknown")``."""
    repo = Path(repo)
    if _inside(dest, REPO):
        raise ValueError(f"{dest} is inside this repository; the authors' code must stay out of it")
    if (repo / AUTHORS_SUBDIR / "train.py").is_file():  # a checkout
        shutil.copytree(repo / AUTHORS_SUBDIR, dest / AUTHORS_SUBDIR, ignore=shutil.ignore_patterns("__pycache__"))
        commit = _git(["-C", str(repo), "rev-parse", "HEAD"], check=False)
    elif (repo / "HEAD").is_file() and (repo / "objects").is_dir():  # a git directory (a mirror is bare)
        data = _git_bytes(["--git-dir", str(repo), "archive", "--format=tar", "HEAD", AUTHORS_SUBDIR])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")  # "data": no links out of dest, no absolute paths
        commit = _git(["--git-dir", str(repo), "rev-parse", "HEAD"], check=False)
    else:
        raise FileNotFoundError(f"{repo} is neither a git directory nor a checkout holding {AUTHORS_SUBDIR}/train.py")
    folder = dest / AUTHORS_SUBDIR
    if not (folder / "train.py").is_file():
        raise FileNotFoundError(f"{AUTHORS_SUBDIR}/train.py is not in {repo}")
    return folder, commit or "unknown"


def _git_bytes(args: list[str]) -> bytes:
    done = subprocess.run(["git", *args], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _git(args: list[str], check: bool = True) -> str:
    try:
        return _git_bytes(args).decode().strip()
    except RuntimeError:
        if check:
            raise
        return ""


def authors_command(data_root: Path, rounds: int, seed: int, work: Path) -> list[str]:
    return [sys.executable, "train.py", "--data_root", str(data_root), "--comm_rounds", str(rounds),
            "--seed", str(seed), *AUTHORS_SETTINGS, "--log_root", str(work / "log"),
            "--model_root", str(work / "checkpoint"), "--affix", AUTHORS_AFFIX]


# --- our code -------------------------------------------------------------------------------


def ours_command(data_root: Path, rounds: int, seed: int, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "spafl", "train", "--preset", "fmnist-lenet5", "--rounds", str(rounds), "--seed",
            str(seed), "--data-root", str(data_root), "--out", str(out), "--no-plot", "--no-progress", *extra]


def read_history(path: Path) -> list[dict]:
    """``[{round, seconds, acc, density}]`` from a ``spafl train`` run's ``history.csv``."""
    with path.open(newline="") as f:
        return [{"round": int(r["round"]), "seconds": float(r["wall_s"]), "acc": float(r["acc_mean"]),
                 "density": float(r["density"])} for r in csv.DictReader(f)]


# --- running a side -------------------------------------------------------------------------


def _thread_env(threads: int, pythonpath: list[Path] | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_side(command: list[str], cwd: Path, env: dict, output: Path, poll: Callable[[], list[dict]],
             on_row: Callable[[dict], None], poll_s: float = 2.0) -> list[dict]:
    """Run ``command``, its stdout and stderr into ``output``; every ``poll_s`` seconds and at
    the end, ``poll()`` returns the rounds recorded so far, and each new one goes to ``on_row``.
    Raises ``RuntimeError`` (with the end of the output) when the command fails."""
    seen: list[dict] = []

    def drain():
        rows = poll()
        for row in rows[len(seen):]:
            seen.append(row)
            on_row(row)

    with output.open("wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                drain()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    drain()
    if proc.returncode != 0:
        tail = output.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(command)} exited with {proc.returncode}; the end of its output:\n{tail}")
    return seen


def _file_poll(path: Path, read: Callable[[Path], list[dict]]) -> Callable[[], list[dict]]:
    def poll():
        return read(path) if path.is_file() else []

    return poll


def _log_rows(path: Path) -> list[dict]:
    return parse_authors_log(path.read_text(errors="replace").splitlines())


# --- the summary ----------------------------------------------------------------------------


def _median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def side_stats(rows: list[dict], full_run: int = FULL_RUN) -> dict:
    """Per-round statistics of one side's rows (sorted by round)."""
    secs = [r["seconds"] for r in rows]
    n = len(secs)
    third = max(1, n // 3)
    tail = secs[-min(10, n):]
    measured = sum(secs)
    extrapolated = n < full_run
    total = measured + (full_run - n) * _median(tail) if extrapolated else sum(secs[:full_run])
    q = statistics.quantiles(secs, n=10, method="inclusive") if n >= 2 else [secs[0]] * 9
    return {"rounds": n, "median": _median(secs), "p20": q[1], "p80": q[7], "first": _median(secs[:third]),
            "last": _median(secs[-third:]), "measured_s": measured, "full_s": total, "extrapolated": extrapolated,
            "final_acc": rows[-1]["acc"], "final_density": rows[-1]["density"]}


def summarize(sides: dict[str, list[dict]], threads: int, env: dict, commands: dict[str, str], authors: str = "authors",
              full_run: int = FULL_RUN) -> str:
    """The Markdown summary of ``{side: rows}`` (``authors`` names the authors' side)."""
    sides = {k: sorted(v, key=lambda r: r["round"]) for k, v in sides.items() if v}
    if not sides:
        return "No rounds were recorded.\n"
    common = set.intersection(*({r["round"] for r in rows} for rows in sides.values()))
    same = {k: [r for r in rows if r["round"] in common] for k, rows in sides.items()}
    out = ["# Per-round time: the SpaFL authors' code and spafl, Fashion-MNIST LeNet-5\n",
           f"Machine: {env['device']}; torch {env['torch']}, Python {env['python']}, spafl {env['spafl']}; "
           f"{threads} thread{'s' if threads != 1 else ''} (OMP_NUM_THREADS) per side, one process per side, "
           f"the sides run one after the other. {len(common)} rounds common to every side. Commands:\n"]
    out += [f"- {k}: `{c}`" for k, c in commands.items() if k in sides]
    out += ["", "| side | rounds | median s/round (p20-p80) | first third | last third | drift | measured s | "
                f"{full_run}-round s | final acc % | final density |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, rows in sides.items():
        s = side_stats(rows, full_run)
        label = f"{s['full_s']:.0f} (extrapolated)" if s["extrapolated"] else f"{s['full_s']:.0f} (measured)"
        out.append(f"| {k} | {s['rounds']} | {s['median']:.2f} ({s['p20']:.2f}-{s['p80']:.2f}) | {s['first']:.2f} | "
                   f"{s['last']:.2f} | {s['last'] / s['first']:.2f}x | {s['measured_s']:.0f} | {label} | "
                   f"{s['final_acc']:.2f} | {s['final_density']:.3f} |")
    if authors in same and same[authors]:
        out += ["", f"Over the {len(common)} common rounds:"]
        base = same[authors]
        for k, rows in same.items():
            if k == authors or not rows:
                continue
            med = _median(r["seconds"] for r in base) / _median(r["seconds"] for r in rows)
            tot = sum(r["seconds"] for r in base) / sum(r["seconds"] for r in rows)
            out.append(f"- {k} is {med:.2f}x faster per round than the authors' code (ratio of medians), "
                       f"{tot:.2f}x over the total of those rounds.")
    out += ["", "Accuracy (%, mean over clients) and density (mean layer density) by round:", "",
            "| round | " + " | ".join(f"{k} acc | {k} density" for k in sides) + " |",
            "|---" * (1 + 2 * len(sides)) + "|"]
    rounds = sorted(common)
    if rounds:
        step = max(1, len(rounds) // 10)
        picked = sorted(set(rounds[::step]) | {rounds[-1]})
        by_round = {k: {r["round"]: r for r in rows} for k, rows in sides.items()}
        for t in picked:
            out.append(f"| {t} | " + " | ".join(f"{by_round[k][t]['acc']:.2f} | {by_round[k][t]['density']:.3f}"
                                                for k in sides) + " |")
    out += ["", "Reading these figures:",
            f"- {full_run}-round times marked 'extrapolated' are the measured rounds plus the remaining rounds at the "
            "median time of the last 10 measured ones, not measurements. Densities keep falling after round 60, "
            "so a side whose round time follows density runs its later rounds faster than this assumes.",
            "- The authors' code evaluates all 100 clients after every round; spafl re-evaluates only the sampled "
            "clients (the others' models did not change, so their cached results stand). Part of the difference "
            "is that evaluation work, part the training itself.",
            "- The sides ran one after the other on a machine that may be shared: 'drift' (the last third's median "
            "over the first third's) shows how each side's round time moved during its run; absolute seconds on a "
            "shared machine are only comparable within this table.",
            "- The two codes split the data, sample clients and initialise the model with different random "
            "generators: the trajectories are comparable in trend, not round by round."]
    return "\n".join(out) + "\n"


# --- command line ---------------------------------------------------------------------------


def _ours_config(text: str) -> tuple[str, list[str]]:
    label, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._+-]+", label) or label == "authors":
        raise ValueError(f"--ours takes LABEL=ARGS with a label of letters, digits, '._+-' (not 'authors'), "
                         f"got {text!r}")
    return label, shlex.split(rest)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--authors-repo", type=Path, default=None,
                   help="the authors' repository: a git directory (bare mirror or .git) or a checkout; needed when "
                        "the authors' side runs")
    p.add_argument("--data-root", type=Path, required=True,
                   help="folder holding FashionMNIST/raw (torchvision's layout), given to both sides")
    p.add_argument("--rounds", type=int, default=60, help="rounds of each side (>= 60 for densities to fall as in a "
                                                          "real run; 2-3 for a smoke test)")
    p.add_argument("--seed", type=int, default=1, help="seed of both sides (the authors' run command uses 1)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and MKL_NUM_THREADS of both sides")
    p.add_argument("--sides", nargs="+", choices=["authors", "ours"], default=["authors", "ours"],
                   help="which sides to run, in this order")
    p.add_argument("--ours", action="append", default=None, metavar="LABEL=ARGS",
                   help="a configuration of our side: its label and extra arguments of spafl train (repeatable; "
                        "default: 'spafl=' with none)")
    p.add_argument("--csv", type=Path, required=True, help="the per-round CSV (written as rounds are read)")
    p.add_argument("--append", action="store_true", help="add to an existing --csv of the same columns")
    p.add_argument("--summary", type=Path, default=None, help="also write the Markdown summary to this file")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the authors' code, logs and our run folders go (default: a new temporary folder, "
                        "removed at the end unless --keep); must be outside this repository")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between reads of the sides' log files")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if not args.poll_s > 0:
        p.error(f"--poll-s must be positive, got {args.poll_s}")
    if "authors" in args.sides and args.authors_repo is None:
        p.error("--authors-repo is needed to run the authors' side")
    try:
        ours = [_ours_config(text) for text in (args.ours or ["spafl="])]
    except ValueError as e:
        p.error(str(e))
    if len({label for label, _ in ours}) != len(ours):
        p.error("--ours labels must differ")
    data_root = args.data_root.resolve()
    if not (data_root / "FashionMNIST" / "raw").is_dir():
        p.error(f"{data_root} has no FashionMNIST/raw folder (torchvision's layout)")
    if args.workdir is not None and _inside(args.workdir, REPO):
        p.error(f"--workdir {args.workdir} is inside this repository; the authors' code must stay out of it")
    try:
        sink = CsvSink(args.csv, COLUMNS, append=args.append)
    except ValueError as e:
        p.error(str(e))

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="spafl-side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    base = {"device": env["device"], "torch": env["torch"], "python": env["python"], "spafl": env["spafl"],
            "threads": args.threads}
    print(f"# {env['device']}; torch {env['torch']}, spafl {env['spafl']}; OMP_NUM_THREADS={args.threads}; "
          f"{args.rounds} rounds, seed {args.seed}; work folder {work}", flush=True)
    sides: dict[str, list[dict]] = {}
    commands: dict[str, str] = {}
    commit, status = "", 0
    try:
        for which in args.sides:
            if which == "authors":
                folder, commit = export_authors_code(args.authors_repo, work / "authors")
                command = authors_command(data_root, args.rounds, args.seed, work)
                runs = [("authors", command, folder, _thread_env(args.threads, [SHIMS]), f"PYTHONPATH={SHIMS} ",
                         _file_poll(work / "log" / AUTHORS_AFFIX / "train_log.txt", _log_rows))]
            else:
                runs = []
                for label, extra in ours:
                    out = work / f"ours-{label}"
                    if out.exists():
                        shutil.rmtree(out)
                    command = ours_command(data_root, args.rounds, args.seed, out, extra)
                    runs.append((label, command, REPO, _thread_env(args.threads), "",
                                 _file_poll(out / "history.csv", read_history)))
            for label, command, cwd, side_env, shown_env, poll in runs:
                shown = (f"cd {cwd} && {shown_env}OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} "
                         + shlex.join(["python", *command[1:]]))
                commands[label] = shown
                print(f"# {label}: {shown}", flush=True)
                start = time.perf_counter()

                def on_row(row, label=label, shown=shown, commit=commit):
                    sink.write({**row, **base, "side": label, "timestamp": timestamp(),
                                "authors_commit": commit if label == "authors" else "", "command": shown})
                    print(f"{label:<16} round {row['round']:>4}  {row['seconds']:8.2f} s  acc {row['acc']:6.2f}%  "
                          f"density {row['density']:.3f}", flush=True)

                sides[label] = run_side(command, cwd, side_env, work / f"{label}.out", poll, on_row, args.poll_s)
                print(f"# {label}: {len(sides[label])} rounds in {time.perf_counter() - start:.0f} s", flush=True)
    except KeyboardInterrupt:
        print(f"# interrupted; {args.csv} holds the rounds read so far", flush=True)
        status = 130
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"authors_side_by_side: {e}", file=sys.stderr)
        status = 1
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if status == 0:
        text = summarize(sides, args.threads, env, commands)
        print(text, end="")
        if args.summary:
            args.summary.write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
