"""Command-line options shared by commands: one per method parameter of the registry."""
import click

from .. import methods


def method_param_options(fn):
    """One click option per method parameter in the registry (shared names share an option)."""
    seen = {}
    for m in methods.REGISTRY.values():
        for p in m.params:
            seen.setdefault(p.name, p)
    for p in reversed(list(seen.values())):
        flag = "--" + p.name.replace("_", "-")
        names = [flag, *p.aliases]
        if isinstance(p.default, bool):
            fn = click.option(f"{flag}/--no-{flag[2:]}", p.name, default=None, help=p.help)(fn)
        else:
            kind = click.Choice(p.choices) if p.choices else None
            fn = click.option(*names, p.name, type=kind, help=p.help)(fn)
    return fn


def listed(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c'] (None stays None)."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None
