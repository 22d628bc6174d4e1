"""The `fastlora` command's argument parser: argparse, with the conventions users expect.

- No abbreviations (allow_abbrev=False): `--epoch` is refused, never read as `--epochs`.
- A misspelt flag or command is refused with the closest known one: "did you mean --epochs?".
- Hugging Face's underscore spellings are read as the dashed ones (`--learning_rate` is
  `--learning-rate`), as transformers' HfArgumentParser accepts both.
- Every option's help shows its default (ArgumentDefaultsHelpFormatter), except a None or False
  default, where the help says what happens instead.
"""
import argparse
import difflib


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; '(default: X)' after each option's help unless X is None or False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _commands(parser):
    """{name: sub-parser} of `parser`'s sub-commands ({} when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _did_you_mean(word, known):
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with no abbreviations, "did you mean", underscore spellings and
    defaults in the help. Sub-parsers made by add_subparsers() are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if args is None:
            import sys
            args = sys.argv[1:]
        return super().parse_known_args(self._checked(list(args)), namespace)

    def _checked(self, args):
        """`args` with underscore spellings of known flags dashed; an unknown flag or command is an
        error naming the closest known one. Only tokens argparse itself would take for a flag are
        looked at (a value with a space in it is a value)."""
        commands, parser, out = _commands(self), self, []
        for i, token in enumerate(args):
            if token == "--":
                return out + args[i:]
            if token.startswith("--") and " " not in token:
                flag, eq, value = token.partition("=")
                known = parser._option_string_actions
                if flag not in known and flag.replace("_", "-") in known:
                    flag = flag.replace("_", "-")
                    token = flag + eq + value
                elif flag not in known:
                    parser.error(f"unrecognized argument {flag}{_did_you_mean(flag, known)}")
            elif parser is self and commands and not token.startswith("-"):
                if token not in commands:
                    self.error(f"unknown command {token!r}{_did_you_mean(token, commands)} "
                               f"(commands: {', '.join(commands)})")
                parser = commands[token]
            out.append(token)
        return out
