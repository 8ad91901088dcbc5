"""Dotted field paths on typed specs (`optim.lr`, `compress.distill`): read one, or patch one.

A stage's `tune.field` names the field a run takes from its sweep's best run. `field_value` reads it
from a typed spec; `with_field` returns the spec with it replaced (`dataclasses.replace` along the
path, the value checked and converted as the spec loader converts YAML, `config.convert`), so a
tuned spec stays one typed object from loading to training. A path that names no field raises a
`SpecError` naming it, with a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pcbench.spec.config import SpecError, convert, to_dict
from pcbench.util.suggest import did_you_mean


def _step(node: Any, name: str, dotted: str, path: str) -> None:
    """Refuse `name` unless it is a field of the dataclass `node` (the next step along `dotted`)."""
    if not dataclasses.is_dataclass(node):
        what = "it is unset" if node is None else f"it is a {type(node).__name__}"
        raise SpecError(path, f"{dotted!r} names no field: {name!r} cannot be looked up ({what})")
    names = [f.name for f in dataclasses.fields(node)]
    if name not in names:
        raise SpecError(path, f"{dotted!r} names no field: unknown {name!r}{did_you_mean(name, names)}; "
                        f"valid: {', '.join(names)}")


def field_value(spec: Any, dotted: str, path: str = "field") -> Any:
    """The value of the field `dotted` on the typed `spec`."""
    node = spec
    for name in dotted.split("."):
        _step(node, name, dotted, path)
        node = getattr(node, name)
    return node


def with_field(spec: Any, dotted: str, value: Any, path: str = "spec") -> Any:
    """A copy of the typed `spec` with the field `dotted` set to `value` (converted to the field's
    type; a mistyped value raises a `SpecError` at `path.<dotted>`). `spec` itself is unchanged."""
    name, _, rest = dotted.partition(".")
    _step(spec, name, dotted, path)
    where = f"{path}.{name}"
    if rest:
        new = with_field(getattr(spec, name), rest, value, where)
    else:
        value = to_dict(value)  # a sub-spec (e.g. all of `optim`) is converted like its YAML mapping
        new = convert(typing.get_type_hints(type(spec))[name], value, where)
    return dataclasses.replace(spec, **{name: new})
