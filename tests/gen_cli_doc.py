"""Write docs/cli.md, the table of commands, from the `neurotap` argument parser itself.

    python tests/gen_cli_doc.py > docs/cli.md

tests/test_docs.py checks that docs/cli.md equals what this prints, so a new command or option
fails the tests until the page is regenerated."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, List, Tuple


def commands(parser: argparse.ArgumentParser) -> List[str]:
    """Every leaf command, in full: ['neurotap generate', ..., 'neurotap neat calibrate', ...]."""
    return [full for full, _, _ in _commands(parser, parser.prog)]


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[Tuple[str, str, argparse.ArgumentParser]]:
    """(full command, one-line help, parser) of every leaf command, in the parser's order."""
    for action in parser._actions:  # argparse has no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                full = f"{prefix} {name}"
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, full)
                else:
                    yield full, helps.get(name, ""), sub


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option_rows(parser: argparse.ArgumentParser) -> List[str]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            name = ", ".join(f"`{o}`" for o in a.option_strings)
            if a.nargs != 0:
                name += f" `{a.metavar or a.dest.upper()}`"
        else:
            name = f"`{a.metavar or a.dest}`" + (" (optional)" if a.nargs in ("?", "*") else "")
            if a.nargs == "+":
                name += " ..."
        if a.required:
            default = "required"
        elif a.nargs == 0:
            default = "off"
        elif a.default is None or a.default == argparse.SUPPRESS:
            default = ""
        else:
            default = f"`{a.default}`"
        extra = f" (one of: {', '.join(map(str, a.choices))})" if a.choices else ""
        if isinstance(a, argparse._AppendAction) and "repeatable" not in (a.help or ""):
            extra += " (repeatable)"
        rows.append(f"| {name} | {_cell(default)} | {_cell((a.help or '').replace('%%', '%'))}{extra} |")
    return rows


def render(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal: fix the width
    cmds = list(_commands(parser, parser.prog))
    out = ["# Commands", "",
           "Every `neurotap` command with its options, as `neurotap COMMAND --help` gives them. This page is",
           "generated from the parser (`python tests/gen_cli_doc.py > docs/cli.md`; a test checks it is current).",
           "Errors print `neurotap: error: ...` and exit with status 2; Ctrl-C exits with 130.", "",
           "| command | what it does |", "|---|---|"]
    for full, help_, _ in cmds:
        anchor = full.replace(" ", "-")
        out.append(f"| [`{full}`](#{anchor}) | {_cell(help_)} |")
    top = _option_rows(parser)
    if top:  # options of `neurotap` itself (beside -h)
        out += ["", "Options of `neurotap` itself:", "", "| argument | default | meaning |", "|---|---|---|", *top]
    for full, help_, sub in cmds:
        anchor = full.replace(" ", "-")
        out += ["", f"## {full} {{#{anchor}}}", "", help_[:1].upper() + help_[1:] + ".", "",
                "```", sub.format_usage().strip().replace("usage: ", "", 1), "```", "",
                "| argument | default | meaning |", "|---|---|---|", *_option_rows(sub)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    from neurotap.apps.cli import build_parser

    sys.stdout.write(render(build_parser()))
