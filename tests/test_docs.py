"""The READMEs name only command-line flags that exist: every ``--flag`` in them is accepted by
one of our commands (or is one of the few other tools' flags they show)."""

import argparse
import re
from pathlib import Path

import pytest
from _examples import load_example, load_script

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "examples" / "README.md",
           *sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))]
# pytest-benchmark's and pip's, as the READMEs' commands use them.
OTHER_TOOLS = {"--benchmark-disable", "--benchmark-json", "--no-build-isolation"}


class _Parsed(Exception):
    pass


def _our_flags(monkeypatch) -> set[str]:
    """The option strings of every command's parser (and of its subcommands' parsers),
    captured as each main parses its args."""
    from resnet_fast import cli
    from resnet_fast.bench import cli as bench_cli
    from resnet_fast.bench import overhead, report

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
