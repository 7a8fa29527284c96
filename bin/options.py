"""Command-line options shared by commands: method parameters of the registry, comma lists."""
import click

from .. import methods
from ..engine.flags import Flag


def param_options(params):
    """A decorator adding one click option per methods.Param (default None: not given); values stay
    strings for Param.coerce, except choices."""
    def decorate(fn):
        for p in reversed(list(params)):
            flag = "--" + p.name.replace("_", "-")
            if isinstance(p.default, bool):
                fn = click.option(f"{flag}/--no-{flag[2:]}", p.name, default=None, help=p.help)(fn)
            else:
                kind = click.Choice(p.choices) if p.choices else None
                fn = click.option(flag, *p.aliases, p.name, type=kind, help=p.help)(fn)
        return fn
    return decorate


def method_param_options(fn):
    """One click option per method parameter in the registry and per calibration parameter (shared names share
    an option)."""
    seen = {}
    for params in [*(m.params for m in methods.REGISTRY.values()), *(c[1] for c in methods.CALIBRATIONS.values())]:
        for p in params:
            seen.setdefault(p.name, p)
    return param_options(seen.values())(fn)


def listed(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c'] (None stays None)."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def spec_option(flag: Flag, **extra):
    """A click option for a MergeSpec or RunOptions field, as engine/flags.py writes it (flag, help,
    default); `extra`: what only click needs (a type, an environment variable, ...)."""
    names = [flag.flag, *([flag.short] if flag.short else []), flag.field]
    shown = {"default": flag.default, "show_default": True} if flag.default not in (None, False) else {}
    return click.option(*names, help=flag.help, **({"is_flag": True} if flag.switch else {}), **shown, **extra)
