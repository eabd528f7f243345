"""Providers from packages, for ``keepstream serve``: ``--provider-factory pkg.module:name``
and the ``keepstream.providers`` entry-point group.

A factory takes the server's ``Settings`` and returns ``{provider name: provider}``, where a
provider is a ``Provider`` or an async generator function (as ``Keepstream.add_provider``
takes): the same generator code runs embedded or served.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from functools import partial
from importlib.metadata import entry_points

from streaming import Provider, TextGenerator

from ._settings import Settings

ENTRY_POINT_GROUP = "keepstream.providers"

ProviderFactory = Callable[[Settings], Mapping[str, Provider | TextGenerator]]


def load_factory(spec: str) -> ProviderFactory:
    """The callable ``spec`` names (``package.module:attribute``); ``ValueError`` if none."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"provider factory {spec!r}: expected package.module:callable")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"provider factory {spec!r}: cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"provider factory {spec!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"provider factory {spec!r} is not callable")
    return target


def plugin_providers(settings: Settings) -> dict[str, Provider | TextGenerator]:
    """The providers every installed entry point of ``keepstream.providers`` and every
    ``--provider-factory`` adds. ``ValueError`` names a factory that fails or a provider
    name two of them claim."""
    factories: list[tuple[str, Callable[[], ProviderFactory]]] = [
        (f"entry point {point.name} ({point.value})", point.load)
        for point in entry_points(group=ENTRY_POINT_GROUP)
    ]
    factories += [(spec, partial(load_factory, spec)) for spec in settings.factories]
    providers: dict[str, Provider | TextGenerator] = {}
    for source, load in factories:
        try:
            factory = load()  # ``load_factory``'s own errors name the spec already
        except ValueError:
            raise
        except Exception as exc:  # an entry point that does not import
            raise ValueError(f"{source} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        try:
            made = factory(settings)
        except Exception as exc:
            raise ValueError(f"{source} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(made, Mapping):
            raise ValueError(f"{source} returned {type(made).__name__}, not a mapping")
        for name, provider in made.items():
            if name in providers:
                raise ValueError(f"{source}: another factory already added provider {name!r}")
            providers[name] = provider
    return providers
