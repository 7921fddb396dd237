"""The README and the guides in docs/ say what the code does: their Python blocks run as written,
their commands parse with the current command lines, their links resolve, the quick start installs
what CI installs, and no extra replaces the installed torch.

Commands are parsed, not run (a whole federated run or benchmark suite would take minutes);
the quick start's run is `.ci/run`'s, the examples' are tests/test_examples.py's."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # 3.10: the extras' tests have nothing to read; the others run
    tomllib = None

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
# The guides written for users; the design notes (algorithm, kernels, sparsyfed, ...) hold no commands to run.
GUIDES = ["getting-started", "layers", "federated", "baselines", "flower", "security", "backends", "benchmarks",
          "testing"]
PAGES = [README, ROOT / "docs" / "README.md", *(ROOT / "docs" / f"{name}.md" for name in GUIDES)]


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def _commands(path: Path) -> list[list[str]]:
    """Every command of the page's bash blocks: continuation lines joined, comments dropped,
    ``a && b`` split."""
    out = []
    for block in _blocks(path, "bash"):
        current = ""
        for line in block.splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            current += line.rstrip().rstrip("\\") + " "
            if line.rstrip().endswith("\\"):
                continue
            for part in current.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    out.append(words)
            current = ""
    return out


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes (a run folder) writes here
    for block in _blocks(page, "python"):
        exec(compile(block, str(page), "exec"), {"__name__": "__doc_block__"})


def _extras() -> dict[str, list[str]]:
    if tomllib is None:
        return {}
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _load(script: Path):
    sys.path.insert(0, str(script.parent))
    try:
        name = f"_doc_{script.stem}"
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(script.parent))


def _check_command(words: list[str], page: Path) -> None:
    where = f"{page.name}: {' '.join(words)}"
    if words[:3] == ["python", "-m", "spafl"] or words[0] == "spafl":
        from spafl.cli import build_parser

        args = words[3:] if words[0] == "python" else words[1:]
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"{where}: does not parse ({e})") from None
    elif words[0] in ("python", "bash") and words[1].endswith((".py", ".sh")):
        script = ROOT / words[1]
        assert script.is_file(), f"{where}: no such file"
        if script.parent.name == "benchmarks" and script.stem in ("kernels", "e2e"):
            parser = _load(script).build_parser(False)
            try:
                parser.parse_args(words[2:])
            except SystemExit as e:
                raise AssertionError(f"{where}: does not parse ({e})") from None
    elif words[0] == "pip" and words[1] == "install" and tomllib is not None:
        for word in words[2:]:
            m = re.fullmatch(r"\.\[(.*)\]", word)
            for extra in m.group(1).split(",") if m else []:
                assert extra in _extras(), f"{where}: no extra {extra!r} in pyproject.toml"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_parse(page):
    for words in _commands(page):
        _check_command(words, page)


def test_command_checker_catches_stale_commands():
    with pytest.raises(AssertionError, match="does not parse"):
        _check_command(["spafl", "train", "--no-such-flag"], README)
    with pytest.raises(AssertionError, match="no such file"):
        _check_command(["python", "examples/missing.py"], README)
    with pytest.raises(AssertionError, match="no extra"):
        _check_command(["pip", "install", "-e", ".[nope]"], README)
    with pytest.raises(AssertionError, match="does not parse"):
        _check_command(["python", "benchmarks/kernels.py", "--suite", "galaxy"], README)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def _ci_extras() -> set[str]:
    text = (ROOT / ".ci" / "run").read_text()
    return {e for m in re.findall(r'-e "\.\[(.*?)\]"', text) for e in m.split(",")}


def test_quick_start_installs_what_ci_installs():
    """The README's test command runs every test CI runs only if both install the same extras."""
    first = _commands(README)[0]
    assert first[:2] == ["pip", "install"] and "torch==2.13.0" in first
    extras = {e for w in first if (m := re.fullmatch(r"\.\[(.*)\]", w)) for e in m.group(1).split(",")}
    assert extras == {"test", "flower"}
    ci_tests = [line.split() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.startswith("python -m pytest")]
    assert ci_tests and _commands(README)[2] == ci_tests[0], "the README's test command is not .ci/run's"
    assert _commands(README)[2][:4] == ["python", "-m", "pytest", "-q"]
    ci = _ci_extras()
    assert ci and ci <= extras, f".ci/run installs {sorted(ci)}, the README {sorted(extras)}"


def _requires(name: str, extras: set[str], seen: set[str]) -> None:
    """Every distribution ``name[extras]`` pulls in, by the installed metadata, into ``seen``."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    try:
        reqs = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            _requires(req.name, set(req.extras), seen)


@pytest.mark.parametrize("extra", sorted(_extras()))
def test_no_extra_pulls_torch(extra):
    """An extra that depends on torch (torchvision did) lets pip replace the installed build, the
    CPU one by a CUDA one of another version. Checked through what is installed here."""
    seen: set[str] = set()
    for text in _extras()[extra]:
        req = Requirement(text)
        assert req.name not in ("torch", "torchvision", "torchaudio"), f"extra {extra!r} names {req.name}"
        _requires(req.name, set(req.extras), seen)
    assert not seen & {"torch", "torchvision", "torchaudio"}, f"extra {extra!r} pulls {sorted(seen)}"
