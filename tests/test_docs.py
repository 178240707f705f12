"""The READMEs and docs name only command-line flags that exist: every ``--flag`` in them is
accepted by one of our commands (or is one of the few other tools' flags they show). README.md
stays a few screens, every relative link in it and in docs/ resolves, and every number its
Results state is in a committed result table."""

import argparse
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from _examples import load_example, load_script

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "examples" / "README.md",
           ROOT / "benchmarks" / "results" / "README.md",
           *sorted((ROOT / "benchmarks" / "results").glob("*/README.md")),
           *sorted((ROOT / "docs").glob("*.md"))]
# README.md holds what it is, the headline results, install, the make targets, a quickstart
# and links; the rest lives in docs/ and benchmarks/results/README.md.
README_MAX_CHARS = 8500
# pytest-benchmark's and pip's, as the READMEs' commands use them.
OTHER_TOOLS = {"--benchmark-disable", "--benchmark-json", "--no-build-isolation"}


class _Parsed(Exception):
    pass


def _our_flags(monkeypatch) -> set[str]:
    """The option strings of every command's parser (and of its subcommands' parsers),
    captured as each main parses its args."""
    from resnet_fast import cli
    from resnet_fast.bench import overhead, report
    from resnet_fast.cli import bench as bench_cli

    scripts = [*(load_example(name) for name in ("finetune", "classify", "export")),
               load_script(ROOT / "benchmarks" / "profile_cpu.py"),
               load_script(ROOT / "benchmarks" / "tune_triton_conv.py")]
    flags: set[str] = set()

    def capture(self, args=None, namespace=None):
        parsers = [self]
        while parsers:
            parser = parsers.pop()
            flags.update(parser._option_string_actions)
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    for main in (cli.main, bench_cli.main, overhead.main, report.main,
                 *(script.main for script in scripts)):
        with pytest.raises(_Parsed):
            main([])
    return flags


def test_every_flag_the_readmes_name_exists(monkeypatch):
    ours = _our_flags(monkeypatch)
    # every parser was seen, subcommands' included
    assert {"--candidates", "--format", "--opset", "--json", "--epochs", "--top",
            "--debug", "--threads"} <= ours
    named = {}
    for readme in READMES:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme.read_text()):
            named.setdefault(flag, readme.relative_to(ROOT))
    unknown = {f: str(where) for f, where in named.items() if f not in ours | OTHER_TOOLS}
    assert not unknown, f"flags named in the READMEs that no command accepts: {unknown}"


def test_readme_stays_a_few_screens():
    size = len((ROOT / "README.md").read_text())
    assert size <= README_MAX_CHARS, (
        f"README.md has {size} characters, over {README_MAX_CHARS}: move detail to docs/")


# [text](target) and [text]: target, not images' or code's brackets followed by other text.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def _relative_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    targets = [a or b for a, b in _LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]  # scheme, anchor


def test_relative_links_resolve():
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]
    broken = {}
    for doc in docs:
        for target in _relative_links(doc.read_text()):
            path = (doc.parent / unquote(target.split("#", 1)[0])).resolve()
            if not path.exists():
                broken.setdefault(str(doc.relative_to(ROOT)), []).append(target)
    assert not broken, f"relative links to files that do not exist: {broken}"


def test_the_link_check_sees_links():
    text = ("[a](docs/ops.md#build) [b](https://x.org) [c](#install)\n[d]: ../x.md\n"
            "```\n[e](in/code.md)\n```\n")
    assert _relative_links(text) == ["docs/ops.md#build", "../x.md"]


# A number the README's results state: a ratio ("1.03x") or a plain decimal ("25.4").
_NUMBER = re.compile(r"(?<![\w.])\d+\.\d+x?(?![\w.])")


def _results_section(readme: str) -> str:
    return readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]


def _unsourced_numbers(section: str, base: Path) -> dict[str, list[str]]:
    """The numbers of each paragraph or bullet of ``section`` that no committed result table
    holds: the tables are the model benchmarks' (``resnet*.md``, written by ``resnet-fast
    bench`` from the JSON beside them) in the folders of the files the item links to, and a
    number counts where it is a cell of one of their rows. Keyed by the item's first words."""
    items = re.split(r"\n(?=- )|\n\n", section)
    missing = {}
    for item in items:
        numbers = _NUMBER.findall(re.sub(r"\[[^\]]*\]\([^)]*\)", "", item))
        if not numbers:
            continue
        folders = {(base / unquote(t.split("#", 1)[0])).parent for t in _relative_links(item)}
        cells = {cell.strip() for folder in folders for table in sorted(folder.glob("resnet*.md"))
                 for line in table.read_text().splitlines() if line.startswith("|")
                 for cell in line.split("|")}
        absent = [n for n in numbers if n not in cells]
        if absent:
            missing[" ".join(item.split()[:6])] = absent
    return missing


def test_every_results_number_in_the_readme_is_in_a_committed_table():
    section = _results_section((ROOT / "README.md").read_text())
    assert len(_NUMBER.findall(section)) >= 10  # the check reads the section's numbers
    missing = _unsourced_numbers(section, ROOT)
    assert not missing, (f"README.md's Results state numbers that no linked result table "
                         f"(benchmarks/results/<host>/resnet*.md) holds: {missing}")


def test_the_results_check_catches_a_made_up_number():
    section = _results_section((ROOT / "README.md").read_text())
    assert "8.84x eager" in section
    made_up = section.replace("8.84x eager", "8.85x eager")
    assert list(_unsourced_numbers(made_up, ROOT).values()) == [["8.85x"]]
    # a number in an item that links no result file has no source
    unlinked = "- **Some host**: `optimize` is 1.03x the best peer.\n"
    assert list(_unsourced_numbers(unlinked, ROOT).values()) == [["1.03x"]]
