"""Answers checked against ``docs/openapi.yaml``: the schema of the documented response of
an operation (JSON Schema 2020-12, as OpenAPI 3.1 writes it), with every ``$ref`` resolved
inside the document."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
URI = "urn:crm-bridge:openapi"


@functools.cache
def spec() -> dict[str, Any]:
    """The document, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return loaded


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(URI, resource)


def operation_of(path: str) -> str:
    """The documented path template matching a concrete ``/api/...`` path."""
    for template in spec()["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not documented in docs/openapi.yaml")


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check(method: str, path: str, status: int, body: Any) -> None:
    """AssertionError unless ``body`` is what the document says ``method path`` answers with
    ``status`` (the status itself must be documented)."""
    template = operation_of(path.split("?")[0])
    operation = spec()["paths"][template][method.lower()]
    assert str(status) in operation["responses"], \
        f"{method} {template} answered {status}, which is not documented"
    ref = _pointer("paths", template, method.lower(), "responses", str(status))
    response = operation["responses"][str(status)]
    if "$ref" in response:
        ref = response["$ref"].lstrip("#/")
        name = ref.rsplit("/", 1)[-1]
        response = spec()["components"]["responses"][name]
    schema = {"$ref": f"{URI}#/{ref}/content/application~1json/schema"}
    validator = Draft202012Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {template} {status}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5])
