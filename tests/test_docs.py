"""README.md and docs/*.md against the code: every command in a code block names a script or tool that exists and
passes only flags that tool's --help knows, every relative link (and its #heading) resolves, the README links every
docs page and stays short. The --help outputs are read once per tool, three at a time."""

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

# Launchers that forward their flags to a command-line module: check against the module's --help.
FORWARDS = {
    "scripts/train.sh": "causalvdm.cli.train", "scripts/train.py": "causalvdm.cli.train",
    "scripts/sample.sh": "causalvdm.cli.sample", "scripts/sample.py": "causalvdm.cli.sample",
    "causalvdm-train": "causalvdm.cli.train", "causalvdm-sample": "causalvdm.cli.sample",
}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Fenced code blocks -> [(info string, lines)], backslash continuations joined."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        fence = re.match(r"\s*```(.*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1).strip(), []
        elif fence:
            joined = "\n".join(lines).replace("\\\n", " ")
            blocks.append((lang, joined.splitlines()))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a comment
        return line.split("#")[0].split()


def parse(line: str) -> tuple[str, str, list[str]] | None:
    """A command line -> (what it runs: a repo path or a module, how its flags are checked, its arguments), or None
    for a line that is not one of the project's commands. The check is 'module', 'script' (run its --help) or
    'exists' (the file only)."""
    words = split(line)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # NPROC_PER_NODE=2 bash ...
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if head in ("causalvdm-train", "causalvdm-sample"):
        return FORWARDS[head], "module", words[1:]
    if head in ("python", "python3") and len(words) > 2 and words[1] == "-m" and words[2].startswith("causalvdm"):
        return words[2], "module", words[3:]
    if head in ("bash", "python", "python3") and len(words) > 1 and words[1].startswith(("scripts/", "tools/")):
        path, args = words[1], words[2:]
    elif head == "torchrun":
        at = next((i for i, w in enumerate(words) if w.startswith(("scripts/", "tools/"))), None)
        if at is None:
            return None
        path, args = words[at], words[at + 1:]
    else:
        return None
    if path in FORWARDS:
        return FORWARDS[path], "module", args
    if path.startswith("tools/") and (path.endswith(".py") or "--help" in read(path)):
        return path, "script", args
    return path, "exists", args


@cache
def read(path: str) -> str:
    file = ROOT / path
    return file.read_text() if file.is_file() else ""


def commands() -> list[tuple[str, str, tuple[str, str, list[str]]]]:
    """Every command in the pages' code blocks -> [(page, line, parsed)]."""
    found = []
    for page in PAGES:
        for lang, lines in code_blocks(page.read_text()):
            if lang == "python":
                continue
            for line in lines:
                parsed = parse(line.strip())
                if parsed:
                    found.append((page.relative_to(ROOT).as_posix(), line.strip(), parsed))
    return found


def flags_of(args: list[str]) -> set[str]:
    """The --flags a command passes ('[--compile]' and '--dtype=x' included; values after them are not flags)."""
    out = set()
    for word in args:
        match = FLAG.match(word.lstrip("[("))
        if match:
            out.add(match.group(0))
    return out


def help_command(target: str) -> list[str]:
    if target.endswith(".sh"):
        return ["bash", target, "--help"]
    if target.endswith(".py"):
        return [sys.executable, target, "--help"]
    return [sys.executable, "-m", target, "--help"]


def run_help(target: str) -> tuple[int, str]:
    done = subprocess.run(help_command(target), cwd=ROOT, capture_output=True, text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str]]:
    """target -> (exit status, output) of its --help, once per distinct tool."""
    targets = sorted({t for _, _, (t, how, _) in commands() if how in ("module", "script")})
    with ThreadPoolExecutor(3) as pool:
        return dict(zip(targets, pool.map(run_help, targets)))


def unknown_flags(parsed, helps) -> set[str]:
    target, how, args = parsed
    if how == "exists":
        return set()
    known = set(FLAG.findall(helps[target][1]))
    return flags_of(args) - known


def test_pages_have_commands():
    found = commands()
    assert any(line.startswith("bash scripts/demo.sh") for page, line, _ in found if page == "README.md")
    assert any(line.startswith("bash scripts/test.sh") for page, line, _ in found if page == "README.md")
    assert len(PAGES) > 5 and len(found) > 30


def test_commands_name_existing_files():
    missing = []
    for page, line, (target, how, _) in commands():
        if how == "module":
            module = ROOT / (target.replace(".", "/") + ".py")
            if not module.is_file() and not (ROOT / target.replace(".", "/") / "__main__.py").is_file():
                missing.append(f"{page}: {line!r}: no module {target}")
        elif not (ROOT / target).is_file():
            missing.append(f"{page}: {line!r}: no file {target}")
    assert not missing, "\n".join(missing)


def test_command_flags_exist(helps):
    failed = [f"{t}: --help exits {rc}: {out[-2000:]}" for t, (rc, out) in helps.items() if rc != 0]
    for page, line, parsed in commands():
        bad = unknown_flags(parsed, helps)
        if bad:
            failed.append(f"{page}: {line!r}: {parsed[0]} has no {', '.join(sorted(bad))}")
    assert not failed, "\n".join(failed)


def test_made_up_flag_is_caught(helps):
    parsed = parse("python tools/benchmark_speedup.py --config configs/bench/cpu_s2.py --frames-per-moon 3")
    assert parsed[:2] == ("tools/benchmark_speedup.py", "script")
    assert unknown_flags(parsed, helps) == {"--frames-per-moon"}
    parsed = parse("NPROC_PER_NODE=2 bash scripts/sample.sh CONFIG --ckpt CKPT [--no-such-flag]")
    assert unknown_flags(parsed, helps) == {"--no-such-flag"}


def anchors(page: Path) -> set[str]:
    """The #fragments a page's headings answer to, as GitHub makes them: lower case, punctuation dropped,
    spaces to hyphens, a repeated heading numbered -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.+)$", prose(page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchors_follow_github(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# The street's token grid\n## Is it the model or the drift?\n```bash\n# a comment\n```\n"
                    "### On an H200\n### On an H200\n")
    assert anchors(page) == {"the-streets-token-grid", "is-it-the-model-or-the-drift", "on-an-h200", "on-an-h200-1"}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists() or (fragment and linked.suffix == ".md" and fragment not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {Path(t.split("#")[0]).as_posix() for t in LINK.findall(prose(text))}
    unlinked = [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.relative_to(ROOT).as_posix() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"
