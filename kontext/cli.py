"""Shared plumbing of the small `python -m kontext.<command> key=value ...` commands.

They take Hydra-style `key=value` arguments (values parsed as YAML, so `n=5`, `diffusers=true`,
`timesteps=[1.0,0.5,0]`) against a fixed set of keys, without Hydra's output directories; a
value of the wrong type for its default (`n=abc` where the default is 10000) or any other user
error is printed as one line and exits with status 2.

`quote_text` and `text_overrides` let a Hydra entry point take free text (`prompt=make it red,
then blue`, apostrophes, quotes, any Unicode) without the user knowing Hydra's quoting.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kontext.errors import KontextError, first_line


def parse_args(argv: Sequence[str], defaults: dict, usage: str) -> dict:
    """`key=value` arguments over `defaults`; an unknown key or a bare word is a KontextError."""
    from omegaconf import OmegaConf

    args = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        key, sep, _ = arg.partition("=")
        if not sep or not key:
            raise KontextError(f"arguments are key=value, got {arg!r}; {usage.splitlines()[0]}")
        if key not in defaults:
            raise KontextError(f"unknown argument {key!r}; known: {', '.join(sorted(defaults))}")
        try:
            value = OmegaConf.from_dotlist([arg])[key]
        except Exception as err:
            raise KontextError(f"cannot parse {arg!r}: {str(err).splitlines()[0]}") from err
        args[key] = check_type(key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value,
                               defaults[key])
    missing = [k for k, v in args.items() if v == "???"]
    if missing:
        raise KontextError(f"missing required argument(s) {', '.join(f'{k}=...' for k in missing)}; "
                           f"{usage.splitlines()[0]}")
    return args


def check_type(key: str, value, default):
    """`value`, if it has the type of `default` (bool, int, or float that also takes an int); other
    defaults (None, str, lists) take any value."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return value
    if not ok:
        raise KontextError(f"{key} must be {_TYPE_NAMES[type(default)]}, got {value!r}")
    return value


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number"}


def check_int(key: str, value, minimum: int | None = None, maximum: int | None = None):
    """`value` if it is a whole number within [minimum, maximum]; None passes through."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise KontextError(f"{key} must be a whole number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"at least {minimum}" if maximum is None else f"at most {maximum}" if minimum is None
                  else f"between {minimum} and {maximum}")
        raise KontextError(f"{key} must be {bounds}, got {value}")
    return value


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """`path` if a file (or, with `folder`, a folder) can be made there: it is not the other kind,
    no parent is a file, and the nearest existing parent is writable."""
    path = Path(str(path)).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise KontextError(f"{what} {path} is {'a file, not a folder' if folder else 'a folder'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise KontextError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KontextError(f"{what} {path}: cannot write in {parent} (permission denied)")
    return path


def read_text(path: Path, encoding: str, what: str, option: str) -> str:
    """The text of a file (a byte-order mark dropped); an unreadable file, a wrong encoding or an
    unknown codec is one line, naming `option` where it helps."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KontextError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        return data.decode(encoding).removeprefix("\ufeff")
    except LookupError as err:
        raise KontextError(f"{option}={encoding}: unknown text encoding") from err
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise KontextError(f"{what} {path} is not {encoding} text (line {line}: byte 0x{data[err.start]:02x}); "
                           f"convert it or give {option}=latin-1 (or its encoding)") from err


def quote_text(text: str) -> str:
    """A single-quoted Hydra override value that composes to exactly `text`: quotes and the
    backslashes before them are escaped for Hydra, `${` for OmegaConf's interpolation."""
    text = re.sub(r"(\\*)\$\{", lambda m: 2 * m[1] + "\\${", text)
    text = re.sub(r"(\\*)'", lambda m: 2 * m[1] + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: 2 * m[1], text)
    return f"'{text}'"


def _is_quoted(value: str) -> bool:
    """Whether `value` is already one quoted Hydra string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        return isinstance(OverridesParser.create().parse_override(f"k={value}").value(), str)
    except Exception:  # Hydra's parser raises several types
        return False


def _split_items(body: str) -> list[str]:
    """The comma-separated items of a list's body; commas inside an item that starts with a quote
    do not split it."""
    items, item, quote = [], "", None
    for ch in body:
        if quote is None and ch == ",":
            items.append(item)
            item = ""
            continue
        if quote is None and not item.strip() and ch in "'\"":
            quote = ch
        elif ch == quote and not item.endswith("\\"):
            quote = None
        item += ch
    return [*items, item]


def text_overrides(argv: Sequence[str], text_keys: Sequence[str] = (), list_keys: Sequence[str] = ()) -> list[str]:
    """`argv` with the values of `text_keys` (and the items of `list_keys`) quoted for Hydra, so
    that they compose to the text as typed. Already quoted values and `null` are kept."""
    def text(value: str) -> str:
        value = value.strip()
        return value if value == "null" or _is_quoted(value) else quote_text(value)

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in text_keys:
            arg = f"{key}={text(value)}"
        elif sep and key.lstrip("+") in list_keys and value.strip() != "null":
            body = value.strip()
            body = body[1:-1] if body.startswith("[") and body.endswith("]") else body
            items = [text(item) for item in _split_items(body) if item.strip()]
            arg = f"{key}=[{','.join(items)}]"
        out.append(arg)
    return out


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; a KontextError becomes `error: <message>` on stderr and exit status 2."""
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except KontextError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def hydra_guard(hydra_main: Callable[[], object], config_dir: str, config_name: str,
                text_keys: Sequence[str] = (), list_keys: Sequence[str] = ()) -> None:
    """Compose the config once before running a Hydra app, so that an unknown override or a bad
    value is one line (exit 2) instead of Hydra's multi-line report. Imports nothing heavy, so
    an entry point that needs no Lightning starts fast. The values of `text_keys` and the items
    of `list_keys` are free text (see `text_overrides`), except in a multirun sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        sys.argv[1:] = text_overrides(sys.argv[1:], text_keys, list_keys)
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if "-m" not in sys.argv and "--multirun" not in sys.argv and not any(
        a.startswith(("hydra.", "hydra/", "+hydra")) for a in args
    ):
        try:
            with initialize_config_dir(config_dir, version_base="1.3"):
                compose(config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            print(f"error: {first_line(err)} (overrides: {' '.join(args) or 'none'})", file=sys.stderr)
            sys.exit(2)
    hydra_main()
