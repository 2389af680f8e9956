"""dkr(1), written from the argument parser: the man page says what ``--help`` says.

``python -m dkr.cli.manpage > dkr/data/man/dkr.1`` makes the copy the package
installs (setup.cfg data_files: share/man/man1); a test checks it is current.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Iterator, NamedTuple

from dkr import __version__


class Command(NamedTuple):
    name: str
    aliases: list[str]
    help: str
    parser: argparse.ArgumentParser


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """The subcommands of ``parser``, in the order they were added."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for choice in sub._choices_actions:
        command = sub.choices[choice.dest]
        aliases = [name for name, p in sub.choices.items() if p is command and name != choice.dest]
        found.append(Command(choice.dest, aliases, choice.help or "", command))
    return found


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The optional arguments of ``parser`` that a user may give (help and version too)."""
    return (a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS)


def positionals(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    return (a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction))


def value_name(action: argparse.Action) -> str | None:
    """What follows the option (its metavar), None for a flag."""
    if action.nargs == 0:
        return None
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.metavar or action.dest.upper()


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _roff(text: str) -> str:
    """``text`` safe in a roff line: backslashes and dashes kept, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _option_lines(parser: argparse.ArgumentParser, shown: frozenset = frozenset()) -> list[str]:
    """Each option of ``parser`` but those ``shown`` already (the common ones)."""
    lines = []
    for action in options(parser):
        if shown.issuperset(action.option_strings):
            continue
        names = ", ".join(f"\\fB{_roff(name)}\\fR" for name in action.option_strings)
        value = value_name(action)
        lines += [".TP", names + (f" \\fI{_roff(value)}\\fR" if value else ""),
                  _roff(help_text(parser, action))]
    return lines


def _text_block(title: str, body: str) -> list[str]:
    """An epilog's part (examples, environment) as a section."""
    lines = [f".SH {title}"]
    entries = [re.fullmatch(r"  (\S.*?)  +(\S.*)", line) for line in body.splitlines()[1:]]
    if all(entries):
        for entry in entries:
            lines += [".TP", f"\\fB{_roff(entry.group(1))}\\fR", _roff(entry.group(2))]
    else:
        lines += [".nf", *(_roff(line[2:]) for line in body.splitlines()[1:]), ".fi"]
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    from dkr.cli.main import ENVIRONMENT, EXAMPLES

    description = parser.description or ""
    lines = [f'.TH DKR 1 "" "dkr {__version__}" "User Commands"',
             ".SH NAME", f"dkr \\- {_roff(description[:1].lower() + description[1:]).rstrip('.')}",
             ".SH SYNOPSIS", ".B dkr", "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
             ".SH DESCRIPTION", _roff(description),
             "Options that every command takes may be given before the command or after it.",
             ".SH OPTIONS", *_option_lines(parser), ".SH COMMANDS"]
    common = frozenset(name for action in options(parser) for name in action.option_strings)
    for command in commands(parser):
        also = f" (also \\fB{', '.join(command.aliases)}\\fR)" if command.aliases else ""
        usage = command.parser.format_usage().removeprefix("usage: ").strip()
        lines += [f'.SS "dkr {command.name}"', _roff(command.help) + also,
                  ".PP", _roff(" ".join(usage.split()))]
        for action in positionals(command.parser):
            lines += [".TP", f"\\fI{_roff(value_name(action))}\\fR",
                      _roff(help_text(command.parser, action))]
        lines += _option_lines(command.parser, common)
    lines += _text_block("EXAMPLES", EXAMPLES.strip("\n"))
    lines += _text_block("ENVIRONMENT", ENVIRONMENT.strip("\n"))
    lines += [".SH SEE ALSO",
              "\\fBpodman-pull\\fR(1), \\fBskopeo\\fR(1), \\fBsystemd-nspawn\\fR(1), "
              "\\fBmachinectl\\fR(1), \\fBcontainers-registries.conf\\fR(5), "
              "\\fBcontainers-auth.json\\fR(5), \\fBcontainers-policy.json\\fR(5)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    from dkr.cli.main import build_parser
    sys.stdout.write(render(build_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
