"""Shared plumbing of the small `python -m kontext.<command> key=value ...` commands.

They take Hydra-style `key=value` arguments (values parsed as YAML, so `n=5`, `diffusers=true`,
`timesteps=[1.0,0.5,0]`) against a fixed set of keys, without Hydra's output directories; a
user error is printed as one line and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kontext.errors import KontextError


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
        args[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    missing = [k for k, v in args.items() if v == "???"]
    if missing:
        raise KontextError(f"missing required argument(s) {', '.join(f'{k}=...' for k in missing)}; "
                           f"{usage.splitlines()[0]}")
    return args


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; a KontextError becomes `error: <message>` on stderr and exit status 2."""
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except KontextError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def hydra_guard(hydra_main: Callable[[], object], config_dir: str, config_name: str) -> None:
    """Compose the config once before running a Hydra app, so that an unknown override or a bad
    value is one line (exit 2) instead of Hydra's multi-line report. Imports nothing heavy, so
    an entry point that needs no Lightning starts fast."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if "-m" not in sys.argv and "--multirun" not in sys.argv and not any(
        a.startswith(("hydra.", "hydra/", "+hydra")) for a in args
    ):
        try:
            with initialize_config_dir(config_dir, version_base="1.3"):
                compose(config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"error: {first} (overrides: {' '.join(args) or 'none'})", file=sys.stderr)
            sys.exit(2)
    hydra_main()
