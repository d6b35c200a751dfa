"""Server-side registry credentials (PYDLIT_CREDENTIALS), used for a registry a request names
without an `auth`, so that a CI pipeline can submit jobs without ever holding a password.

The file is one of:

- pydlit's own shape, in JSON or YAML: `{"registries": {"host:port": AUTH}}` or just
  `{"host:port": AUTH}`, where AUTH is exactly a request's `auth` object. YAML needs PyYAML,
  which pydlit does not depend on.
- a Docker config.json (`docker login` writes one): `{"auths": {"host": {"auth": base64("user:pass")}}}`
  or `{"username": ..., "password": ...}` per host. The Docker Hub key
  `https://index.docker.io/v1/` (or any of index.docker.io, registry-1.docker.io, docker.io)
  also covers the other two names, unless the file names them itself. An `identitytoken` is
  the refresh token `docker login` keeps instead of a password for registries whose token
  server speaks OAuth2; Docker reports it as user `<token>` with the token as password, and so
  does this store: pydlit then trades it for access tokens with OAuth2's refresh_token grant, as
  Docker and containerd do, and sends it as Basic credentials where that grant does not work.
  Entries pydlit cannot use (empty ones, whose credentials a `credsStore`/`credHelpers` helper
  keeps, and `registrytoken` ones) are skipped with a warning.

A registry is found by the host[:port] of its endpoint, case-insensitively, whatever the scheme.
Ports 80 and 443 are the http and https defaults and are dropped, so `host`, `host:443`,
`https://host/v2` and `http://host` all name the same registry; any other port is part of the name.
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from .schema import RequestError, validate_request

log = logging.getLogger(__name__)

DOCKER_HUB = ("index.docker.io", "registry-1.docker.io", "docker.io")
_DEFAULT_PORTS = (80, 443)
# What validate_request needs around an auth object, so that a file entry is checked and
# normalised exactly as a request's auth is.
_WRAPPER_ENDPOINT = "https://credentials.invalid"


class CredentialsError(Exception):
    """The credentials file cannot be used; names the file and the host, never a secret."""


class CredentialStore:
    """Registry auth dicts by host[:port], as `load` reads them from a file."""

    def __init__(self, by_host: dict[str, dict[str, Any]]) -> None:
        self._by_host = by_host

    @classmethod
    def load(cls, path: str) -> CredentialStore:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise CredentialsError(f"cannot read the credentials file {path}: {reason}") from None
        data = _parse(path, text)
        if not isinstance(data, dict):
            raise CredentialsError(f"the credentials file {path} must hold an object of registries")
        if "auths" in data:
            return cls(_from_docker_config(path, data["auths"]))
        if "registries" in data:
            extra = sorted(str(k) for k in data if k != "registries")
            if extra:
                raise CredentialsError(
                    f"the credentials file {path} has {', '.join(map(repr, extra))} beside 'registries'"
                )
            data = data["registries"]
        return cls(_from_registries(path, data))

    @property
    def hosts(self) -> list[str]:
        """The host[:port] names credentials are held for, sorted."""
        return sorted(self._by_host)

    def lookup(self, endpoint: str) -> dict[str, Any] | None:
        """A copy of the auth dict for the registry at endpoint, or None if there is none."""
        auth = self._by_host.get(host_key(endpoint))
        return copy.deepcopy(auth) if auth is not None else None


def host_key(text: str) -> str:
    """The lower-cased host[:port] of an endpoint or file key, without port 80 or 443.

    Raises ValueError when text names no host or a bad port.
    """
    text = text.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    host = parts.hostname
    if not host:
        raise ValueError("no host")
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    return host if port is None or port in _DEFAULT_PORTS else f"{host}:{port}"


def _parse(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        json_problem = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    try:
        import yaml
    except ImportError:
        raise CredentialsError(
            f"the credentials file {path} is not valid JSON ({json_problem}), and reading it as YAML"
            " needs PyYAML: pip install pyyaml, or write the file as JSON"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # A YAML error's own text quotes the offending line, which may hold a password.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1} column {mark.column + 1})" if mark is not None else ""
        raise CredentialsError(
            f"the credentials file {path} is neither valid JSON ({json_problem}) nor valid YAML{where}"
        ) from None
    if data is None:
        raise CredentialsError(f"the credentials file {path} is empty")
    return data


def _label(key: Any) -> str:
    # A key is a host name, unless someone wrote user:password@host.
    return repr(str(key).rpartition("@")[2])


def _key_of(path: str, key: Any) -> str:
    if not isinstance(key, str):
        raise CredentialsError(f"the credentials file {path}: the key {_label(key)} is not a string")
    try:
        return host_key(key)
    except ValueError:
        raise CredentialsError(
            f"the credentials file {path}: the key {_label(key)} is not a registry host[:port]"
        ) from None


def _add(path: str, by_host: dict[str, dict[str, Any]], host: str, auth: dict[str, Any]) -> None:
    if host in by_host:
        raise CredentialsError(f"the credentials file {path} names the registry {host} twice")
    by_host[host] = auth


def _from_registries(path: str, registries: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(registries, dict):
        raise CredentialsError(f"the credentials file {path}: 'registries' must be an object of hosts")
    by_host: dict[str, dict[str, Any]] = {}
    for key, auth in registries.items():
        host = _key_of(path, key)
        _add(path, by_host, host, _validated(path, host, auth))
    return by_host


def _validated(path: str, host: str, auth: Any) -> dict[str, Any]:
    try:
        request = validate_request({
            "source": {"endpoint": _WRAPPER_ENDPOINT, "image": "x", "ref": "x", "auth": auth},
            "targets": [{"endpoint": _WRAPPER_ENDPOINT, "image": "y"}],
        })
    except RequestError as exc:
        # validate_request never echoes a value under auth, so its message is safe to pass on.
        problem = exc.msg.removeprefix("source.")
        raise CredentialsError(f"the credentials file {path}, entry {host!r}: {problem}") from None
    normalised: dict[str, Any] = request["source"]["auth"]
    if not normalised:
        raise CredentialsError(f"the credentials file {path}, entry {host!r}: holds no credentials")
    return normalised


def _from_docker_config(path: str, auths: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(auths, dict):
        raise CredentialsError(f"the credentials file {path}: 'auths' must be an object of hosts")
    by_host: dict[str, dict[str, Any]] = {}
    hub: dict[str, Any] | None = None
    for key, entry in auths.items():
        host = _key_of(path, key)
        auth = _docker_entry(path, host, entry)
        if auth is None:
            continue
        _add(path, by_host, host, auth)
        if hub is None and host in DOCKER_HUB:
            hub = auth
    if hub is not None:
        for name in DOCKER_HUB:
            by_host.setdefault(name, hub)
    return by_host


def _docker_entry(path: str, host: str, entry: Any) -> dict[str, Any] | None:
    where = f"the credentials file {path}, entry {host!r}"
    if not isinstance(entry, dict):
        raise CredentialsError(f"{where}: must be an object")
    for field in ("auth", "username", "password", "identitytoken", "registrytoken"):
        if field in entry and not isinstance(entry[field], str):
            raise CredentialsError(f"{where}: {field} must be a string")
    if entry.get("identitytoken"):
        return {"basicauth": {"user": "<token>", "password": entry["identitytoken"]}}
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise CredentialsError(f"{where}: auth is not base64") from None
        if not sep or not user:
            raise CredentialsError(f"{where}: auth is not the base64 of user:password")
        return {"basicauth": {"user": user, "password": password}}
    if entry.get("username"):
        return {"basicauth": {"user": entry["username"], "password": entry.get("password", "")}}
    if entry.get("registrytoken"):
        log.warning("credentials file %s: skipping %s: pydlit cannot use a registrytoken", path, host)
    else:
        log.warning("credentials file %s: skipping %s: it holds no credentials (a credential helper keeps them?)", path, host)
    return None
