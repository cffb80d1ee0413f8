"""A verb's options generated from its stage's settings model, so each option is declared once (mergekit style).

`settings_options()` replaces each parameter of a verb annotated with a settings model (`settings: AnalyzeSettings`)
by one typer option per field, with the field's type, default and description (the help text), and calls the verb
with the model built from them. Where
the command line writes a field differently (another name, type, default, or a converter such as a
comma-separated list), the verb passes a `CliForm` for that field: the one place such a difference is written.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from pydantic import BaseModel

_SAME: Any = object()


@dataclass(frozen=True)
class CliForm:
    """How the command line writes a field: each attribute left out is the field's own."""

    name: str | None = None  # the option's parameter name (`--max-shard-size-gb` for max_shard_bytes)
    type: Any = None  # the type typer parses, e.g. str for a comma-separated list
    default: Any = _SAME
    help: str | None = None
    convert: Callable[[Any], Any] | None = None  # command-line value -> field value


def settings_options(
    exclude: tuple[str, ...] = (), **forms: CliForm
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a verb: each parameter annotated with a settings model stands for that model's fields as options."""

    def decorate(verb: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(verb, include_extras=True)
        params: list[inspect.Parameter] = []
        models: dict[str, tuple[type[BaseModel], dict[str, tuple[str, Any]]]] = {}
        for p in inspect.signature(verb).parameters.values():
            hint = hints[p.name]
            if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
                params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hint))
                continue
            fields = models.setdefault(p.name, (hint, {}))[1]
            for name, field in hint.model_fields.items():
                if name in exclude:
                    continue
                form = forms.get(name, CliForm())
                option = form.name or name
                default = field.default if form.default is _SAME else form.default
                if field.is_required() and form.default is _SAME:
                    default = p.empty
                annotation = Annotated[form.type or field.annotation, typer.Option(help=form.help or field.description)]
                params.append(inspect.Parameter(option, p.KEYWORD_ONLY, default=default, annotation=annotation))
                fields[option] = (name, form.convert)

        def command(**values: Any) -> Any:
            for param, (model, fields) in models.items():
                settings = {}
                for option, (name, convert) in fields.items():
                    value = values.pop(option)
                    settings[name] = convert(value) if convert is not None else value
                values[param] = model(**settings)
            return verb(**values)

        command.__name__, command.__doc__, command.__module__ = verb.__name__, verb.__doc__, verb.__module__
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
