"""Validation and normalisation of the POST /api/distribute/image body.

REQUEST_SCHEMA is the single source of truth for the request shape; it is
plain JSON Schema 2020-12 so it can be embedded in the OpenAPI document as is.
validate_request() turns the first relevant schema violation into a
RequestError whose message names the JSON path of the problem.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import ssl
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from .registry.client import repository_name, split_endpoint, trust
from .registry.manifests import DIGEST

MAX_TARGETS = 100

# Every pattern below is a whole-string pattern written as ^...$ so that
# OpenAPI tooling using ECMA-262 regexes reads them the same way we do.
ENDPOINT_PATTERN = (
    r"^https?://"
    r"(?:\[[0-9A-Fa-f:.]+\]"
    r"|[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]{1,5})?"
    r"(?:/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$"
)
# Distribution spec repository name grammar.
IMAGE_PATTERN = (
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
REF_PATTERN = (
    r"^(?:[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}|sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$"
)
AUTH_URL_PATTERN = r"^https?://[^\s/?#@]+(?:[/?][^\s#]*)?$"
TOKEN_TYPE_PATTERN = r"^(?:[Bb][Ee][Aa][Rr][Ee][Rr]|[Jj][Ww][Tt])$"
# RFC 9110 token; header names outside it are rejected by HTTP clients anyway,
# but only at copy time, long after the request was accepted.
_HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
HEADER_NAME_PATTERN = rf"^{_HEADER_NAME}$"
HEADER_VALUE_PATTERN = r"^[^\r\n]*$"
HEADER_LINE_PATTERN = rf"^{_HEADER_NAME}:[^\r\n]*$"
CA_CERT_PATTERN = r"^[\s\S]*-----BEGIN CERTIFICATE-----[\s\S]*$"
IMAGE_MAX_LENGTH = 255
ENDPOINT_MAX_LENGTH = 2048

# Keyed by pattern rather than by path so the same wording is used wherever a
# $def is reused (source and every target).
_PATTERN_PROBLEMS = {
    ENDPOINT_PATTERN: (
        "must be an http:// or https:// URL with a host, an optional port and path,"
        " and no credentials, query string or fragment"
    ),
    IMAGE_PATTERN: (
        "must be a repository name: lowercase alphanumeric components separated"
        " by '.', '_', '__' or '-', joined by '/'"
    ),
    REF_PATTERN: "ref must be a tag or a digest (sha256:<64 hex> or sha512:<128 hex>)",
    AUTH_URL_PATTERN: "must be an http:// or https:// URL",
    TOKEN_TYPE_PATTERN: "must be 'Bearer' or 'JWT'",
    HEADER_NAME_PATTERN: "header names must be HTTP tokens",
    HEADER_VALUE_PATTERN: "must not contain line breaks",
    HEADER_LINE_PATTERN: (
        "must be an object of header names to values or a 'Name: value' string"
    ),
    CA_CERT_PATTERN: "must be a PEM certificate (-----BEGIN CERTIFICATE-----)",
}

_BOOLEAN_FALSE = {"type": "boolean", "default": False}

REQUEST_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    # Gives "#/$defs/..." a base of its own, so the refs still resolve once the
    # schema is embedded in a larger (OpenAPI) document.
    "$id": "urn:pydlit:schema:distribute-image-request",
    "title": "Distribute image request",
    "description": "Copy one image from a source registry to one or more target registries.",
    # Here and in every object below, additionalProperties comes before
    # required: errors at the same depth are reported in keyword order, and a
    # misspelt key is better reported as unknown than as the key it misses.
    "type": "object",
    "additionalProperties": False,
    "required": ["source", "targets"],
    "properties": {
        "source": {"$ref": "#/$defs/source"},
        "targets": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_TARGETS,
            "items": {"$ref": "#/$defs/target"},
        },
        "referrers": {
            "description": (
                "Also copy the image's referrers (OCI 1.1: signatures, SBOMs, attestations whose"
                " subject is one of the image's manifests), and theirs, and its digest tags"
                " (cosign's sha256-<hex>.sig, .att, .sbom), before the target's tag."
            ),
            "type": "boolean",
            "default": False,
        },
    },
    "$defs": {
        "endpoint": {
            "description": (
                "Registry base URL, scheme://host[:port][/prefix][/v2][/];"
                " reported back exactly as given."
            ),
            "type": "string",
            "maxLength": ENDPOINT_MAX_LENGTH,
            "pattern": ENDPOINT_PATTERN,
        },
        "image": {
            "description": "Repository name, e.g. library/hello-world.",
            "type": "string",
            "maxLength": IMAGE_MAX_LENGTH,
            "pattern": IMAGE_PATTERN,
        },
        "ref": {
            "description": "Tag (e.g. latest) or digest (e.g. sha256:...).",
            "type": "string",
            "pattern": REF_PATTERN,
        },
        "ca_cert": {
            "description": "PEM CA certificate(s) to trust for this registry.",
            "type": "string",
            "pattern": CA_CERT_PATTERN,
        },
        "auth": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": {
                    "description": "Token endpoint URL; may carry a query string.",
                    "type": "string",
                    "pattern": AUTH_URL_PATTERN,
                },
                "token_type": {
                    "description": "Bearer or JWT, in any letter case.",
                    "type": "string",
                    "pattern": TOKEN_TYPE_PATTERN,
                },
                "header": {
                    "description": "Extra headers: an object, or one 'Name: value' string.",
                    # Each keyword applies only to its own type, so this reads as
                    # "object of str->str, or a header line" without an anyOf
                    # (whose errors best_match reports poorly).
                    "type": ["object", "string"],
                    "pattern": HEADER_LINE_PATTERN,
                    "propertyNames": {"pattern": HEADER_NAME_PATTERN},
                    "additionalProperties": {
                        "type": "string",
                        "pattern": HEADER_VALUE_PATTERN,
                    },
                },
                "json": {
                    "description": (
                        "JSON payload to send to the token endpoint: an object, or a string"
                        " holding one (as the original pydlit's requests send it)."
                    ),
                    # What a string must hold is checked by validate_request: the keywords
                    # that could say so (contentSchema) only annotate, they do not validate.
                    "type": ["object", "string"],
                },
                "basicauth": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["user", "password"],
                    "properties": {
                        "user": {"type": "string", "minLength": 1},
                        "password": {"type": "string"},
                    },
                },
            },
        },
        "source": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoint", "image", "ref"],
            "properties": {
                "endpoint": {"$ref": "#/$defs/endpoint"},
                "image": {"$ref": "#/$defs/image"},
                "ref": {"$ref": "#/$defs/ref"},
                "auth": {"$ref": "#/$defs/auth"},
                "verify_tls": _BOOLEAN_FALSE,
                "ca_cert": {"$ref": "#/$defs/ca_cert"},
            },
        },
        "target": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoint"],
            "properties": {
                "endpoint": {"$ref": "#/$defs/endpoint"},
                "overwrite": _BOOLEAN_FALSE,
                "verify_tls": _BOOLEAN_FALSE,
                "auth": {"$ref": "#/$defs/auth"},
                "image": {
                    "description": "Target repository; absent means the source image.",
                    "$ref": "#/$defs/image",
                },
                "ref": {
                    "description": "Target tag or digest; absent means the source ref.",
                    "$ref": "#/$defs/ref",
                },
                "ca_cert": {"$ref": "#/$defs/ca_cert"},
            },
        },
    },
}


def _whole_string_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    # jsonschema runs patterns through Python's re.search, where "$" also
    # matches before a trailing newline ("latest\n" would pass). JSON Schema
    # means ECMA-262, where it does not; every pattern here is ^...$, for which
    # fullmatch is the ECMA-262 behaviour.
    if validator.is_type(instance, "string") and not re.fullmatch(pattern, instance):
        yield ValidationError(f"does not match {pattern!r}")


_VALIDATOR = validators.extend(Draft202012Validator, {"pattern": _whole_string_pattern})(
    REQUEST_SCHEMA
)

_TYPE_NAMES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "boolean": "a boolean",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREVIEW_LIMIT = 60
_MAX_LISTED_KEYS = 5
_TOKEN_TYPES = {"bearer": "Bearer", "jwt": "JWT"}
# Anything under auth may be a credential (password, header value, token
# payload, token URL query), and a "ca_cert" may be a private key pasted by
# mistake: name the place, never the value.
_UNECHOED_KEYS = frozenset({"auth", "ca_cert"})
_BAD_HOST_OR_PORT = "must have a port between 1 and 65535 and, if bracketed, an IPv6 host"
_JSON_STRING_PROBLEM = "must be a JSON object or a string holding one, and this string holds no JSON object"


class RequestError(ValueError):
    """A request body that does not satisfy REQUEST_SCHEMA (HTTP 400)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def _truncate(text: str) -> str:
    if len(text) <= _PREVIEW_LIMIT:
        return text
    return f"{text[:_PREVIEW_LIMIT]}... ({len(text)} characters)"


# An endpoint's user and password: all up to its last '@' (after a scheme), whatever they hold.
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?)[\s\S]*@")


def _preview(value: Any) -> str:
    # Containers are never echoed: they may hold an auth block.
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        if len(value) <= _PREVIEW_LIMIT:
            return repr(value)
        return f"{value[:_PREVIEW_LIMIT]!r}... ({len(value)} characters)"
    return _truncate(json.dumps(value))


def _render_path(path: Iterable[str | int]) -> str:
    rendered = ""
    for part in path:
        if isinstance(part, int):
            rendered += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            rendered += f".{part}" if rendered else part
        else:
            rendered += f"[{_truncate(json.dumps(part))}]"
    return rendered or "request body"


def _expected_types(types: str | list[str], at_root: bool) -> str:
    if at_root:
        return "a JSON object"
    if isinstance(types, str):
        types = [types]
    return " or ".join(_TYPE_NAMES.get(name, name) for name in types)


def _unknown_keys(error: ValidationError) -> str:
    known = error.schema.get("properties", {})
    extras = sorted(key for key in error.instance if key not in known)
    listed = ", ".join(repr(_truncate(key)) for key in extras[:_MAX_LISTED_KEYS])
    more = len(extras) - _MAX_LISTED_KEYS
    suffix = f" and {more} more" if more > 0 else ""
    return f"unknown key{'s' if len(extras) > 1 else ''} {listed}{suffix}"


def _problem(error: ValidationError) -> tuple[str, bool]:
    """The problem with the failing instance, and whether showing it helps."""
    keyword, value, instance = error.validator, error.validator_value, error.instance
    if keyword == "type":
        return f"must be {_expected_types(value, not error.path)}", True
    if keyword == "required":
        missing = next(name for name in value if name not in instance)
        return f"{missing!r} is a required property", False
    if keyword == "additionalProperties":
        return _unknown_keys(error), False
    if keyword == "minItems":
        return "must hold at least one target", False
    if keyword == "maxItems":
        return f"must hold at most {value} targets, got {len(instance)}", False
    if keyword == "minLength":
        return "must not be empty", False
    if keyword == "maxLength":
        return f"must be at most {value} characters, got {len(instance)}", False
    if keyword == "pattern":
        return _PATTERN_PROBLEMS[value], True
    # Only reached if the schema grows a keyword without a wording here; a
    # vague 400 beats a 500.
    return f"does not satisfy {keyword!r}", True


def _message(path: Sequence[str | int], problem: str, show: bool, instance: Any) -> str:
    if path and path[-1] == "endpoint" and isinstance(instance, str):
        instance = _USERINFO.sub(r"\1***@", instance)
    if show and _UNECHOED_KEYS.isdisjoint(path):
        problem = f"{problem}, got {_preview(instance)}"
    return f"{_render_path(path)}: {problem}"


def _relevance(error: ValidationError) -> int:
    # Shallowest first, as best_match's default, but ties go to the first
    # error in schema/document order (source before targets, targets[0] before
    # targets[1]) rather than the last, so the answer reads top-down.
    return -len(error.path)


def _endpoint_problem(endpoint: str) -> str | None:
    """What the endpoint pattern cannot express: port range, IPv6 syntax."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
        if parts.netloc.startswith("["):
            ipaddress.IPv6Address(parts.hostname or "")
    except ValueError:
        return _BAD_HOST_OR_PORT
    return _BAD_HOST_OR_PORT if port == 0 else None


def _locations(body: dict) -> Iterator[tuple[list[str | int], dict]]:
    yield ["source"], body["source"]
    for index, target in enumerate(body["targets"]):
        yield ["targets", index], target


def _normalise_auth(path: list[str | int], auth: dict) -> None:
    payload = auth.get("json")
    if isinstance(payload, str):
        try:
            auth["json"] = json.loads(payload)
        except (ValueError, RecursionError):
            auth["json"] = None
        if not isinstance(auth["json"], dict):
            raise RequestError(_message([*path, "auth", "json"], _JSON_STRING_PROBLEM, False, None))
    if "token_type" in auth:
        auth["token_type"] = _TOKEN_TYPES[auth["token_type"].lower()]
    header = auth.get("header")
    if isinstance(header, str):
        name, _, value = header.partition(":")
        auth["header"] = {name: value.strip()}


def validate_request(body: object) -> dict:
    """Validate a distribute request and return a normalised deep copy.

    In the copy, the source and every target have verify_tls (default False);
    referrers is set (False); every target has overwrite (False), image and ref (None: same as the
    source); auth token_type is spelled "Bearer" or "JWT"; a "Name: value"
    auth header is an object, and so is an auth json given as a string holding one. Endpoints
    are kept exactly as given.

    Raises RequestError naming the JSON path of the most relevant problem;
    values under auth are never echoed.
    """
    error = best_match(_VALIDATOR.iter_errors(body), key=_relevance)
    if error is not None:
        problem, show = _problem(error)
        raise RequestError(_message(list(error.absolute_path), problem, show, error.instance))
    for path, location in _locations(body):
        problem = _endpoint_problem(location["endpoint"])
        if problem is not None:
            raise RequestError(_message([*path, "endpoint"], problem, True, location["endpoint"]))

    request = copy.deepcopy(body)
    for path, location in _locations(request):
        location.setdefault("verify_tls", False)
        if "auth" in location:
            _normalise_auth(path, location["auth"])
    request.setdefault("referrers", False)
    for target in request["targets"]:
        target.setdefault("overwrite", False)
        target.setdefault("image", None)
        target.setdefault("ref", None)
    _check_destinations(request)
    _check_certificates(request)
    return request


def _check_certificates(request: dict) -> None:
    """A ca_cert that looks like PEM but is none is refused now, not when its job runs."""
    for path, location in _locations(request):
        if location.get("ca_cert"):
            try:
                trust(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), location["ca_cert"])
            except ValueError:
                raise RequestError(f"{_render_path([*path, 'ca_cert'])}: must be a PEM certificate that can be loaded") from None


def _check_destinations(request: dict) -> None:
    """What the schema cannot say: where the targets lead, each with the source's image and ref
    where it names none."""
    source = request["source"]
    source_ref = source["ref"]
    seen = {_destination(source, source): "the source"}
    for index, target in enumerate(request["targets"]):
        ref = target["ref"] or source_ref
        both_digests = DIGEST.fullmatch(ref) and DIGEST.fullmatch(source_ref)
        if both_digests and ref != source_ref and ref.partition(":")[0] == source_ref.partition(":")[0]:
            raise RequestError(
                f"targets[{index}].ref: {ref} is not the source's digest {source_ref}: a manifest is pushed "
                "under its own digest only (name a tag, or no ref)"
            )
        where = _destination(target, source)
        if where in seen:
            raise RequestError(f"targets[{index}]: the same repository and ref as {seen[where]}")
        seen[where] = f"targets[{index}]"


def _destination(location: dict, source: dict) -> tuple[str, str, str]:
    base = split_endpoint(location["endpoint"])[0].lower()
    return base, repository_name(base, location.get("image") or source["image"]), location.get("ref") or source["ref"]
