"""The one registry and the one way to check a method's parameters.

Every kind of method (metrics, layer-wise allocators, row-wise allocators, block scores, searches) keeps its
entries in a :class:`Registry`: a read-only mapping from name to entry whose :meth:`Registry.get` names the
valid choices when a name is unknown. Every method's user-settable parameters are a :class:`Params` subclass
(a pydantic model): unknown names, values of the wrong kind (a bool for a number, a float for an integer
unless it is whole, a number for a string), non-finite numbers and values out of range are one-line
:class:`~prunekit.core.errors.PrunekitError` s, raised before any work.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Annotated, Generic, Iterator, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from .errors import PrunekitError

T = TypeVar("T")
_MISSING = object()


class Registry(MutableMapping, Generic[T]):
    """Name -> entry, filled by the methods' registration calls (``prunekit.methods`` imports them all).
    ``add`` refuses a name registered twice; item assignment replaces an entry on purpose (tests, benchmarks)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str, default=_MISSING) -> T:  # type: ignore[override]
        """The entry; for an unknown name ``default`` when given, else a PrunekitError listing the valid names."""
        if name in self._entries:
            return self._entries[name]
        if default is not _MISSING:
            return default
        raise PrunekitError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._entries))}")

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _whole(v):
    """An integer given as a whole float (YAML ``2.0``) counts as that integer; bools stay bools (refused)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_whole)]
# a list of numbers (a tuple from Python counts as a list)
Floats = Annotated[list[float], BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)]


class Params(BaseModel):
    """Base of every method's parameter class; fields are the parameters with their defaults and ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def check(cls, given: dict | None, what: str, method: str) -> "Params":
        """``given`` validated (``what`` and ``method`` name the source in the message, e.g.
        ``metric_params`` and ``ria``)."""
        try:
            return cls(**(given or {}))
        except ValidationError as e:
            raise PrunekitError(f"{what}: {method} {_explain(e.errors(), list(cls.model_fields))}") from None

    def kwargs(self) -> dict:
        return dict(self)


class NoParams(Params):
    """A method without user-settable parameters."""


_KINDS = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
          "float_type": "a finite number", "finite_number": "a finite number", "float_parsing": "a finite number",
          "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
          "tuple_type": "a list"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _explain(errors: list[dict], valid: list[str]) -> str:
    """One line for the first parameter that failed (a union field's alternatives joined by 'or')."""
    first = errors[0]
    if not first.get("loc"):  # a rule across parameters (a model validator)
        return " ".join(str(first.get("msg", "")).removeprefix("Value error, ").split())
    name = str(first["loc"][0])
    value = first.get("input")
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return f"has no parameter {name!r}; valid: {', '.join(valid) or 'none'}"
    wants = []
    for err in errors:
        if (str(err["loc"][0]) if err.get("loc") else "") != name:
            continue
        k = err.get("type", "")
        if k in _KINDS:
            wants.append(_KINDS[k])
        elif k in _BOUNDS:
            op, key = _BOUNDS[k]
            wants.append(f"{op} {err['ctx'][key]}")
        elif k == "literal_error":
            wants.append(str(err["ctx"]["expected"]))
        else:
            wants.append(" ".join(str(err.get("msg", "")).removeprefix("Value error, ").split()))
    return f"{name} must be {' or '.join(dict.fromkeys(wants))}, got {value!r}"
