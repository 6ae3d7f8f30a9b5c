"""The HTTP API as an OpenAPI 3.1 document, generated from the routes the worker serves.

Each handler method declares what it reads and answers with :func:`operation` (request body,
query, responses: pydantic models or types, the same the handler uses); :func:`document` walks
every route registered with the web server (``app.page``, wherever it is called), so a route
added anywhere appears in ``GET /openapi.json``. A route whose handler declares nothing is
listed with ``x-undocumented: true`` (a test fails on it).

This module imports nothing of Faust or the app: it is given the routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from phoneverify.interfaces.bodies import ApiError
from phoneverify.models.messages import INSTANCE_ID

METHODS = ("get", "post", "put", "patch", "delete")
REF = "#/components/schemas/{model}"
#: The attribute :func:`operation` sets on a handler.
ATTRIBUTE = "__openapi__"


@dataclass(frozen=True)
class Operation:
    """What one handler (method and path) reads and answers."""

    summary: str
    #: Answers by status: a model or type for a JSON body, ``None`` for none.
    responses: Mapping[int, Any]
    body: Any = None
    body_required: bool = True
    #: The request's media type (JSON unless said).
    body_media: str = "application/json"
    #: A pydantic model whose fields are the query parameters.
    query: type[BaseModel] | None = None
    #: Path parameters' schemas beyond :data:`PATH_PARAMETERS`, by name.
    path: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The API key is needed (``X-API-Key``): adds 401 and 413.
    key: bool = True
    #: Headers of an answer, by status: name -> description.
    headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    #: An answer's media type(s) other than JSON, by status (text/html, text/plain...).
    media: Mapping[int, str | tuple[str, ...]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    description: str = ""


def operation(summary: str, **details: Any) -> Callable[[Any], Any]:
    """Declare a handler's request and answers (see :class:`Operation`)."""

    def declare(handler: Any) -> Any:
        setattr(handler, ATTRIBUTE, Operation(summary, **details))
        return handler

    return declare


#: Any one of them: the API key (API_KEY, or one of API_KEYS).
SECURITY = [{"apiKey": []}, {"functionsKey": []}, {"code": []}]
#: Path parameters by name, when a route has them.
PATH_PARAMETERS = {
    "instance_id": {"type": "string", "pattern": f"^{INSTANCE_ID.pattern}$",
                    "description": "the verification's instance id"},
    "event_name": {"type": "string", "examples": ["SmsChallengeResponse"],
                   "description": "the event raised (SmsChallengeResponse: the code)"},
}

STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted", 204: "No content",
               400: "Bad input", 401: "Missing or wrong X-API-Key", 403: "Forbidden",
               404: "Not found", 409: "Conflict", 410: "Gone: already concluded",
               413: "Request body too large", 429: "Too many requests",
               500: "Internal error", 503: "Not available now; retry",
               504: "No reply in time (the command may still take effect)"}


def document(routes: Iterable[tuple[str, Any]], *, title: str, version: str,
             description: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (path, view: a class with handler methods
    named after HTTP methods, as Faust's views)."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for path, view in sorted(routes, key=lambda route: route[0]):
        item: dict[str, Any] = {}
        for method in METHODS:
            handler = getattr(view, method, None)
            if handler is None or not _overridden(view, method):
                continue
            declared: Operation | None = getattr(handler, ATTRIBUTE, None)
            item[method] = _operation(path, method, view.__name__, declared, schemas)
        if item:
            parameters = [_path_parameter(name) for name in re.findall(r"{(\w+)}", path)]
            if parameters:
                item["parameters"] = parameters
            paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 **({"description": description} if description else {})},
        "paths": paths,
        "components": {
            "schemas": schemas.resolve(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "functionsKey": {"type": "apiKey", "in": "header", "name": "x-functions-key",
                                 "description": "the same key, as Azure Functions takes it"},
                "code": {"type": "apiKey", "in": "query", "name": "code",
                         "description": "the same key in the query, as Azure Functions "
                                        "takes it (it ends up in logs: prefer a header)"},
            },
        },
    }


def _overridden(view: type, method: str) -> bool:
    """Whether ``view`` defines ``method`` itself or in a base of its own (not Faust's)."""
    for klass in view.__mro__:
        if method in vars(klass):
            return klass.__module__.split(".")[0] != "faust"
    return False


def _path_parameter(name: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    schema = schema or PATH_PARAMETERS.get(name, {"type": "string"})
    return {"name": name, "in": "path", "required": True,
            "description": schema.get("description", name),
            "schema": {k: v for k, v in schema.items() if k != "description"}}


def _operation(path: str, method: str, view: str, declared: Operation | None,
               schemas: _Schemas) -> dict[str, Any]:
    operation_id = f"{view}_{method}"
    if declared is None:
        return {"operationId": operation_id, "summary": f"{method.upper()} {path}",
                "x-undocumented": True, "responses": {"default": {"description": "any"}}}
    responses = dict(declared.responses)
    if declared.key:
        responses.setdefault(401, ApiError)
        responses.setdefault(413, ApiError)
    answers: dict[str, Any] = {}
    for status in sorted(responses):
        answer: dict[str, Any] = {"description": STATUS_TEXT.get(status, str(status))}
        model = responses[status]
        if model is not None:
            media = declared.media.get(status, "application/json")
            if media == "application/json":
                answer["content"] = {media: {"schema": schemas.of(model, "serialization")}}
            else:
                answer["content"] = {name: {"schema": {"type": "string"}} for name in
                                     ((media,) if isinstance(media, str) else media)}
        if status in declared.headers:
            answer["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                                 for name, text in declared.headers[status].items()}
        answers[str(status)] = answer
    result: dict[str, Any] = {
        "operationId": operation_id,
        "summary": declared.summary,
        "security": SECURITY if declared.key else [],
        "responses": answers,
    }
    if declared.description:
        result["description"] = declared.description
    if declared.tags:
        result["tags"] = list(declared.tags)
    parameters = [_path_parameter(name, declared.path[name]) for name in declared.path]
    if declared.query is not None:
        parameters += _query(declared.query)
    if parameters:
        result["parameters"] = parameters
    if declared.body is not None:
        result["requestBody"] = {
            "required": declared.body_required,
            "content": {declared.body_media: {"schema": schemas.of(declared.body,
                                                                   "validation")}}}
    return result


def _query(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A query model's fields as parameters (their schemas inline: strings and numbers)."""
    schema = model.model_json_schema(ref_template=REF)
    assert "$defs" not in schema, f"{model.__name__}: query parameters are plain values"
    required = set(schema.get("required", ()))
    parameters = []
    for name, property_ in schema.get("properties", {}).items():
        property_ = {k: v for k, v in property_.items() if k != "title"}
        options = property_.pop("anyOf", None)
        if options:  # X | None: absent is the None; a query parameter is never null
            property_.update(next(o for o in options if o.get("type") != "null"))
            if property_.get("default", 0) is None:
                del property_["default"]
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                     "schema": property_}
        if "description" in property_:
            parameter["description"] = property_.pop("description")
        parameters.append(parameter)
    return parameters


class _Schemas:
    """JSON Schemas of the models used, each once under ``components/schemas``."""

    def __init__(self) -> None:
        self.wanted: dict[tuple[int, JsonSchemaMode], tuple[Any, dict[str, Any]]] = {}

    def of(self, model: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        """A schema that refers to ``model``'s (filled in by :meth:`resolve`)."""
        key = (id(model), mode)
        if key not in self.wanted:
            self.wanted[key] = (model, {})
        return self.wanted[key][1]

    def resolve(self) -> dict[str, Any]:
        inputs = [(key, key[1], model if isinstance(model, TypeAdapter) else TypeAdapter(model))
                  for key, (model, _) in self.wanted.items()]
        found, definitions = TypeAdapter.json_schemas(inputs, ref_template=REF)
        for (key, _mode), schema in found.items():
            self.wanted[key][1].update(schema)
        return dict(sorted(definitions.get("$defs", {}).items()))
