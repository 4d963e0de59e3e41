"""The docs a newcomer reads keep working: README.md stays short, every relative link in
README.md, ARCHITECTURE.md and docs/*.md leads to a file (and heading) of the repository,
every `arc2face-synth` command the README names exists, and the README's Python snippets
run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 260
LINKED_PAGES = [README, ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?$(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def _without_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code removed (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (repeated headings get -1, -2, ...)."""
    anchors: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug, count = _slug(match.group(1)), 0
            while (slug if not count else f"{slug}-{count}") in anchors:
                count += 1
            anchors.add(slug if not count else f"{slug}-{count}")
    return anchors


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `page` that does not resolve to a file (or heading) under `root`."""
    problems = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root) or not resolved.exists():
            problems.append(f"{page.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{page.name}: {target} (no heading #{anchor} in {resolved.name})")
    return problems


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file and a missing heading are both reported, code
    spans are ignored."""
    (tmp_path / "other.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad anchor](other.md#nope) "
        "`[code](missing.md)` [web](https://example.com/x)\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2 and "missing.md" in problems[0] and "#nope" in problems[1]


def test_readme_stays_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move details to docs/"


def test_readme_links_architecture_early() -> None:
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:20])
    assert "(ARCHITECTURE.md)" in head


# --- the commands the README names ------------------------------------------------------


def readme_commands() -> list[tuple[str, ...]]:
    """Each distinct `arc2face-synth WORD [WORD]` in the README's code (blocks and spans)."""
    text = README.read_text(encoding="utf-8")
    code = "\n".join([*FENCE.findall(text), *INLINE_CODE.findall(FENCE.sub("", text))])
    found = re.findall(r"arc2face-synth[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?", code)
    return sorted({(first, second) if second else (first,) for first, second in found})


def test_readme_names_commands() -> None:
    """The extraction below finds the README's commands (it would pass vacuously if not)."""
    named = {command[0] for command in readme_commands()}
    assert {"generate", "plan", "audit", "export", "models", "banks", "demo"} <= named


def test_every_readme_command_exists() -> None:
    """`arc2face-synth CMD [SUB] --help` exits 0 for each command the README names; a
    second word counts as a subcommand when the first is a group (models, banks)."""
    import typer
    from typer.testing import CliRunner

    from flows.cli import app

    cli = typer.main.get_command(app)
    runner = CliRunner()
    for words in readme_commands():
        args = [words[0]]
        command = cli.commands.get(words[0])  # type: ignore[attr-defined]
        assert command is not None, f"README names `arc2face-synth {words[0]}`: no such command"
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            assert len(words) == 2 and words[1] in command.commands, (
                f"README names `arc2face-synth {' '.join(words)}`: "
                f"no such subcommand of {words[0]} ({', '.join(command.commands)})"
            )
            args.append(words[1])
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"arc2face-synth {' '.join(args)} --help: {result.output}"


# --- the README's Python snippets run as written --------------------------------------


def readme_snippet(name: str) -> str:
    """The ```python block right after the README's `<!-- snippet: NAME ... -->` marker."""
    text = README.read_text(encoding="utf-8")
    match = re.search(
        rf"<!-- snippet: {re.escape(name)}\b[^>]*-->\s*```python\n(.*?)^```", text,
        re.DOTALL | re.MULTILINE,
    )  # fmt: skip
    assert match, f"README.md has no ```python block marked <!-- snippet: {name} -->"
    return match.group(1)


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_readme_python_api_snippet_runs(tmp_path: Path) -> None:
    """The Python API section uses only names of the public API, and runs as written on
    tiny models: three images generated and judged, one line each."""
    import arc2face_engine

    code = readme_snippet("python-api")
    imported = re.search(r"from arc2face_engine import \((.*?)\)", code, re.DOTALL)
    assert (
        imported and "import arc2face_engine." not in code and "from arc2face_engine." not in code
    )
    names = {name.strip() for name in imported.group(1).split(",") if name.strip()}
    assert names <= set(arc2face_engine.__all__), names - set(arc2face_engine.__all__)

    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" True " in line or " False " in line for line in lines), (
        result.stdout
    )


def test_readme_reading_snippet_runs(tmp_path: Path) -> None:
    """The walk-through's Python part reads a dataset named `dataset` in the current
    folder: run it on a small dataset of the real format."""
    from tests.dataset_factory import make_dataset

    made = make_dataset(str(tmp_path / "dataset"), n_identities=6, images_per_identity=6, shards=3)
    result = _run_python(readme_snippet("read-dataset"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"images={made.images}" in result.stdout and "(3, 112, 112)" in result.stdout


@pytest.mark.skipif(
    not os.environ.get("ARC2FACE_TEST_WALKTHROUGH"),
    reason="runs the README walk-through's shell block (a minute of CPU, minutes of wall time): set "
    "ARC2FACE_TEST_WALKTHROUGH=1",
)
def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    """The walk-through's shell block, exactly as written, in an empty folder."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Your own dataset on tiny models", 1)[1]
    script = re.search(r"```bash\n(.*?)^```", section, re.DOTALL | re.MULTILINE).group(1)
    cli = shutil.which("arc2face-synth", path=str(Path(sys.executable).parent))
    assert cli, "arc2face-synth is not installed next to this Python"
    env = {**os.environ, "PATH": f"{Path(cli).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert (tmp_path / "dataset" / "audit" / "report.html").is_file()
    assert (tmp_path / "export" / "label_map.csv").is_file()
