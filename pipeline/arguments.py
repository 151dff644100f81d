"""The argument parsers of the `eleatt` commands other than fit|validate|test|predict: argparse's flags, plus
`--config FILE` (a YAML file of the same settings) and `--print_config` (the effective settings as YAML), as the
Lightning CLI of `eleatt fit` has them.

    parser = command_parser("eleatt flow", description="...", epilog="...")
    parser.add_argument("--short-side", type=int, default=256, help="...")   # argparse's add_argument
    args = parser.parse_args(argv)                                          # an argparse.Namespace

A config's keys are the options' destinations (the flag without its leading dashes, `-` written `_`:
`short_side: 256`, `no_progress: true`; a positional by its name, e.g. `videos: [a.mp4]`). Later arguments
override earlier ones: `--config c.yaml --workers 4` takes the workers from the command line, the rest from the
file. `--print_config` prints the settings after the config and every other flag, as YAML that `--config` reads
back, and exits 0 (nothing runs). A key the command does not know, a file that is missing or is not a YAML mapping,
a bad value: one line and exit 2, as every other usage error (`<prog>: error: <message>`, no page of usage).

The parser is a jsonargparse.ArgumentParser (imported when a command builds its parser, not when this module or
the command's module is imported) with argparse's behaviour kept where jsonargparse's differs:
- types are argparse's (`int`, `float`, `str`, `Path` or a function; the same error messages) and also take a
  config's YAML values (`devices: 2` is the string '2' as on the command line; a single value for an option of
  several values is a list of one);
- help texts are printed as written (jsonargparse would add "(type: ..., default: ...)");
- a mutually exclusive group is checked once the config is merged: a config may give its required option, and an
  option of the group on the command line replaces another one of the group given by the config;
- `add_subcommands(parser, dest)` stands for argparse's `add_subparsers(dest=...)`, with `.add_parser(name, help=,
  description=)`; `parse_args` returns the chosen subcommand's options with `dest` set to its name, as argparse does.

A `--config` value that names no file is looked up among the packaged configs (`resolve_config`), so that
`--config flow_dis` or `--config configs/ucf101_rgb.yaml` work outside the checkout; `eleatt configs` lists them
(`configs_main`).
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

PRINT_CONFIG = "--print_config"
# The configs shipped inside the package (pipeline/configs links to the checkout's configs/), found by name from
# anywhere: `--config ucf101_rgb`, `--config ucf101_rgb.yaml` or `--config configs/ucf101_rgb.yaml` when no such file
# exists where the command runs. `eleatt configs` lists them.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
LIST_HINT = "`eleatt configs` lists the packaged ones"
CONFIG_HELP = ("YAML file of these options, keyed by their names with '_' for '-' (e.g. short_side: 256); options "
               "after it override it; --print_config prints the settings (as such a file) and exits")


class ValueTypeError(argparse.ArgumentTypeError, ValueError):
    """A bad value: argparse prints its message as it stands (ArgumentTypeError); jsonargparse, checking a config's
    values, reports it as a bad value of its key (ValueError)."""


class _Type:
    """An argparse `type` that also takes a config's YAML values (already int, float, bool or None). None is an
    unset optional value and stays None."""

    def __init__(self, convert, name: str):
        self.convert = convert
        self.__name__ = name  # argparse's "invalid <name> value: 'x'"

    def __call__(self, value):
        if value is None:
            return None
        try:
            return self.convert(value)
        except argparse.ArgumentTypeError as err:
            raise ValueTypeError(str(err)) from None
        except (TypeError, ValueError):
            raise ValueTypeError(f"invalid {self.__name__} value: {value!r}") from None

    def __repr__(self) -> str:
        return self.__name__


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(value)
    return int(value)


def _float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _str(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Path)):  # YAML reads `devices: 2` as 2
        raise TypeError(value)
    return str(value)


def _path(value) -> Path:
    if not isinstance(value, (str, Path)):
        raise TypeError(value)
    return Path(value)


_KNOWN_TYPES = {None: (_str, "str"), str: (_str, "str"), int: (_int, "int"), float: (_float, "float"),
                Path: (_path, "Path")}


def _argparse_type(kind) -> _Type:
    """The `type` given to add_argument as one that takes a config's values too (None: the string as given)."""
    if isinstance(kind, _Type):
        return kind
    if kind in _KNOWN_TYPES:
        return _Type(*_KNOWN_TYPES[kind])
    if isinstance(kind, type):  # jsonargparse would take it as a type hint, with its own messages
        raise TypeError(f"type {kind.__name__}: give int, float, str, Path or a function")
    return _Type(kind, getattr(kind, "__name__", repr(kind)))


def _with_types(kwargs: dict) -> dict:
    if kwargs.get("action", "store") in ("store", "append", "extend"):  # options that take values
        kwargs["type"] = _argparse_type(kwargs.get("type"))
    return kwargs


def _flag(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or (action.metavar if isinstance(action.metavar, str) else action.dest)


def _reword(parser, text: str, config: str | None):
    """jsonargparse's messages in the words of our flags, those about a config file naming the file; returns the
    parser they are about (a subcommand's for its missing options) and the message, one line."""
    text = " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    missing = re.match(r"the following arguments are required: (.*)$", text)
    if missing:  # jsonargparse names the keys (a subcommand's as <name>.<key>); argparse named the flags
        keys = missing.group(1).split(", ")
        prefix = keys[0].split(".")[0] if "." in keys[0] else None
        subparsers = getattr(getattr(parser, "_subcommands", None), "choices", {})
        if prefix in subparsers and all(k.startswith(prefix + ".") for k in keys):
            parser, keys = subparsers[prefix], [k[len(prefix) + 1:] for k in keys]
        actions = {a.dest: a for a in parser._actions}
        names = [_flag(actions[k]) if k in actions else k for k in keys]
        return parser, f"the following arguments are required: {', '.join(names)}"
    subcommand = re.match(r'expected "([^"]+)" to be one of .* but it was not provided', text)
    if subcommand:
        action = next((a for a in parser._actions if a.dest == subcommand.group(1)), None)
        return parser, f"the following arguments are required: {_flag(action) if action else subcommand.group(1)}"
    return parser, text if config is None else _config_problem(text, config)


def _config_problem(text: str, config: str) -> str:
    where = f"--config {config}"
    for pattern, fix in ((r'File does not exist', f"file not found (and no packaged config of that name: {LIST_HINT})"),
                         (r'Path is not a file', "not a file"),
                         (r'Unexpected config', "not a YAML mapping of options (key: value lines)")):
        if re.search(pattern, text):
            return f"{where}: {fix}"
    problem = re.match(r"Problems parsing config\s*:?\s*(.*)$", text)
    if problem:
        return f"{where}: not valid YAML ({problem.group(1)})"
    text = re.sub(r'^Parser key "([^"]+)":\s*', r"\1: ", text)
    return f"{where}: {text}"


def _parser_class():
    """The parser class, made on first use: jsonargparse is imported only by a command that parses its options."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """argparse's help: the texts as written (they state their defaults where it helps)."""

        def _get_help_string(self, action: argparse.Action) -> str:
            return action.help or ""

        def _format_usage(self, usage, actions, *args, **kwargs) -> str:  # argparse's, with [-h]
            actions = [a for a in actions if a.option_strings != [PRINT_CONFIG]]
            return argparse.HelpFormatter._format_usage(self, usage, actions, *args, **kwargs)

    class ConfigFile(ActionConfigFile):
        """--config FILE: its problems name the file; a key the command does not know is refused at once."""

        def __call__(self, parser, cfg, values, option_string=None):
            values = resolve_config(values)  # a packaged config by name: --config flow_dis
            parser._reading = values
            try:
                super().__call__(parser, cfg, values, option_string)
                known = {a.dest for a in parser._actions}
                unknown = [k for k in cfg.keys() if k.split(".")[0] not in known and not k.startswith("__")]
                if unknown:
                    key = unknown[0].split(".")[0]
                    parser.error(f"unknown key '{key}' (not an option of {parser.prog}: see {parser.prog} --help; "
                                 "keys are the option names with '_' for '-')")
            except (TypeError, ValueError) as err:
                parser.error(str(err))
            finally:
                parser._reading = None

    class CommandParser(ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("formatter_class", HelpFormatter)
            super().__init__(*args, env_prefix=False, default_env=False, **kwargs)
            self._reading: str | None = None  # the config file being read, named in its errors
            self._exclusive: list[tuple[argparse._MutuallyExclusiveGroup, bool]] = []
            self._given: set[str] = set()  # destinations of exclusive options given on the command line
            self._subcommand_dest: str | None = None

        def error(self, message: str, ex: Exception | None = None):
            """argparse's last line only: `<prog>: error: <message>`, exit 2."""
            if not self.exit_on_error:
                return super().error(message, ex)
            parser, text = _reword(getattr(ex, "subcommand_parser", None) or self, message, self._reading)
            sys.stderr.write(f"{parser.prog}: error: {text}\n")
            sys.exit(2)

        def add_argument(self, *args, **kwargs):
            action = super().add_argument(*args, **_with_types(kwargs))
            if not action.option_strings and action.nargs == "*":
                action.__class__ = _keeping_configured(type(action))
            return action

        def add_mutually_exclusive_group(self, required: bool = False):
            group = super().add_mutually_exclusive_group(required=required)
            self._exclusive.append((group, required))
            parser = self

            def add_argument(*args, **kwargs):  # argparse's, as jsonargparse does not convert a group's types
                action = argparse._ActionsContainer.add_argument(group, *args, **_with_types(kwargs))
                action.__class__ = _given_on_command_line(type(action), parser)
                return action

            group.add_argument = add_argument
            return group

        def _check_value_key(self, action, value, key, *args, **kwargs):
            if isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):
                if not isinstance(value, bool):  # store_true/store_false: argparse would take any value as given
                    raise TypeError(f'Parser key "{key}": {value!r} is not true or false')
            elif action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
                value = [value]  # a config's single value for an option of several values
            return super()._check_value_key(action, value, key, *args, **kwargs)

        def dump(self, cfg, *args, **kwargs) -> str:
            cfg = cfg.clone()
            for key in cfg.keys():  # YAML has no paths: written as the strings they were read from
                value = cfg[key]
                if isinstance(value, Path) or (isinstance(value, list) and any(isinstance(v, Path) for v in value)):
                    cfg[key] = [str(v) for v in value] if isinstance(value, list) else str(value)
            return super().dump(cfg, *args, **kwargs)

        def _parse_known_args(self, *args, **kwargs):
            # argparse checks that a group's option is given on the command line only: a config may give it
            # (checked in parse_args); the help, printed while parsing, shows the groups as declared
            for group, _ in self._exclusive:
                group.required = False
            try:
                return super()._parse_known_args(*args, **kwargs)
            finally:
                for group, required in self._exclusive:
                    group.required = required

        def format_usage(self) -> str:
            with self._groups_as_declared():
                return super().format_usage()

        def format_help(self) -> str:
            with self._groups_as_declared():
                return super().format_help()

        @contextlib.contextmanager
        def _groups_as_declared(self):
            states = [(group, group.required) for group, _ in self._exclusive]
            for group, required in self._exclusive:
                group.required = required
            try:
                yield
            finally:
                for group, state in states:
                    group.required = state

        def parse_args(self, args=None, namespace=None, **kwargs) -> argparse.Namespace:
            if hasattr(self, "parent_parser"):  # a subcommand's parser, called by jsonargparse's own parse
                return super().parse_args(args, namespace, **kwargs)
            for parser in (self, *self._subparsers_by_name().values()):
                parser._given = set()
            values = super().parse_args(args, namespace, **kwargs).as_dict()
            parser = self
            if self._subcommand_dest is not None:
                name = values[self._subcommand_dest]
                parser = self._subcommands.choices[name]
                values = {**values[name], self._subcommand_dest: name}
            values.pop("config", None)
            for group, required in parser._exclusive:
                if required and all(values.get(a.dest) is None for a in group._group_actions):
                    parser.error(f"one of the arguments {' '.join(_flag(a) for a in group._group_actions)} is "
                                 "required")
            return argparse.Namespace(**values)

        def _subparsers_by_name(self) -> dict:
            return dict(self._subcommands.choices) if self._subcommand_dest is not None else {}

        def _parse_common(self, cfg, *args, **kwargs):
            # the exclusive groups, before --print_config prints the settings
            self._resolve_exclusive(cfg)
            for name, parser in self._subparsers_by_name().items():
                if cfg.get(self._subcommand_dest) == name and cfg.get(name) is not None:
                    parser._resolve_exclusive(cfg[name])
            return super()._parse_common(cfg, *args, **kwargs)

        def _resolve_exclusive(self, cfg) -> None:
            """At most one option of a group: one given on the command line replaces those given by a config."""
            for group, _ in self._exclusive:
                chosen = [a for a in group._group_actions if cfg.get(a.dest) is not None]
                given = [a for a in chosen if a.dest in self._given]
                if len(chosen) > 1 and len(given) == 1:
                    for action in chosen:
                        if action is not given[0]:
                            cfg[action.dest] = action.default
                elif len(chosen) > 1:
                    self.error(f"argument {_flag(chosen[1])}: not allowed with argument {_flag(chosen[0])}")

    CommandParser.ConfigFile = ConfigFile
    _CLASS = CommandParser
    return _CLASS


_CLASS = None


def _given_on_command_line(action_class, parser):
    class Recorded(action_class):
        def __call__(self, parser_, namespace, values, option_string=None):
            parser._given.add(self.dest)
            return super().__call__(parser_, namespace, values, option_string)

    Recorded.__name__ = action_class.__name__
    return Recorded


def _keeping_configured(action_class):
    class KeepingConfigured(action_class):
        """A positional of any number of values: none on the command line leaves those of a config."""

        def __call__(self, parser, namespace, values, option_string=None):
            if values == [] and getattr(namespace, self.dest, None):
                return
            return super().__call__(parser, namespace, values, option_string)

    KeepingConfigured.__name__ = action_class.__name__
    return KeepingConfigured


def command_parser(prog: str, description: str | None = None, epilog: str | None = None, config: bool = True,
                   **kwargs):
    """The parser of command `prog`, taking `--config FILE` and `--print_config` (config=False: neither, for a
    parser whose subcommands take them); add its options with argparse's add_argument (type, choices, nargs,
    store_true, mutually exclusive groups) and read them with `parse_args(argv)` (an argparse.Namespace)."""
    cls = _parser_class()
    parser = cls(prog=prog, description=description, epilog=epilog, **kwargs)
    if config:
        parser.add_argument("--config", action=cls.ConfigFile, help=CONFIG_HELP)
    return parser


class _Subcommands:
    """argparse's subparsers object: add_parser(name, help=, description=) -> the subcommand's parser."""

    def __init__(self, parser, action):
        self.parser, self.action = parser, action

    def add_parser(self, name: str, help: str | None = None, description: str | None = None, **kwargs):
        sub = command_parser(f"{self.parser.prog} {name}", description=description, **kwargs)
        self.action.add_subcommand(name, sub, help=help)
        sub.prog = f"{self.parser.prog} {name}"  # jsonargparse's would read "<prog> [options] <name>"
        return sub


def add_subcommands(parser, dest: str, required: bool = True, metavar: str | None = None) -> _Subcommands:
    """argparse's `parser.add_subparsers(dest=dest, required=required, metavar=metavar)` (jsonargparse's
    add_subcommands); `parser.parse_args` returns the chosen subcommand's options with `dest` set to its name."""
    action = parser.add_subcommands(required=required, dest=dest, metavar=metavar)
    parser._subcommands = action
    parser._subcommand_dest = dest
    return _Subcommands(parser, action)


# -- packaged configs ------------------------------------------------------------------------------------------------
def packaged_configs() -> dict[str, Path]:
    """name -> path of every config shipped with the package (`<name>.yaml` in pipeline/configs), sorted by name."""
    if not PACKAGED_CONFIGS.is_dir():
        return {}
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml")) if p.is_file()}


def resolve_config(value):
    """A `--config` value as the file to read: the value itself when such a file (or folder) exists; otherwise the
    packaged config it names (`ucf101_rgb`, `ucf101_rgb.yaml`, `configs/ucf101_rgb.yaml`); otherwise the value
    unchanged, so that the parser reports the missing file."""
    if not isinstance(value, (str, Path)) or not str(value) or Path(value).exists():
        return value
    path = Path(value)
    if path.parent not in (Path("."), Path("configs")):
        return value  # a path somewhere else is the user's own file
    found = packaged_configs().get(_config_name(str(value)))
    return str(found) if found is not None else value


def _config_name(value: str) -> str:
    """`configs/ucf101_rgb.yaml`, `ucf101_rgb.yaml` or `ucf101_rgb` -> `ucf101_rgb`."""
    name = Path(value).name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def config_summary(path: Path) -> str:
    """A packaged config's first comment line (what it is for), without the leading '#'."""
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return ""
    return first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""


def configs_main(argv: list[str] | None = None) -> int:
    """`eleatt configs [NAME]`: the packaged configs, one a line with what each is for; with NAME, that config's
    text (to copy and edit: `eleatt configs ucf101_rgb > mine.yaml`)."""
    parser = command_parser(
        prog="eleatt configs", config=False,
        description="List the configs shipped with eleatt (training configs for `eleatt fit --config NAME`, "
                    "extraction and flow settings for `eleatt extract|flow --config NAME`), or print one. A "
                    "--config value that names no file is looked up here by name, so `--config ucf101_rgb` works "
                    "from any folder.",
        epilog="exit status: 0 done, 2 unknown name.",
    )
    parser.add_argument("name", nargs="?", default=None, help="a config to print (e.g. ucf101_rgb)")
    args = parser.parse_args(argv)
    configs = packaged_configs()
    if args.name is None:
        if not configs:
            print(f"eleatt configs: no packaged configs found in {PACKAGED_CONFIGS} (reinstall eleatt)", file=sys.stderr)
            return 2
        width = max(len(name) for name in configs)
        for name, path in configs.items():
            print(f"{name:<{width}}  {config_summary(path)}")
        print(f"\n(in {PACKAGED_CONFIGS}; use one by name: eleatt fit --config {next(iter(configs))}; print one "
              "to edit it: eleatt configs NAME > mine.yaml)")
        return 0
    path = configs.get(_config_name(args.name))
    if path is None:
        known = ", ".join(configs) or "none"
        print(f"eleatt configs: error: no packaged config named {args.name!r} (known: {known})", file=sys.stderr)
        return 2
    sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0
