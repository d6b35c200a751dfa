"""PYDLIT_CREDENTIALS: pydlit's JSON/YAML shape and Docker's config.json, host matching, errors."""
from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from pydlit.credentials import CredentialsError, CredentialStore, host_key

PASSWORD = "s3cr3t-PASSWORD"
BASIC = {"basicauth": {"user": "ci-bot", "password": PASSWORD}}


def write(tmp_path: Path, content: Any, name: str = "credentials.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def load(tmp_path: Path, content: Any, name: str = "credentials.json") -> CredentialStore:
    return CredentialStore.load(write(tmp_path, content, name))


def refused(tmp_path: Path, content: Any, *expected: str, name: str = "credentials.json") -> str:
    path = write(tmp_path, content, name)
    with pytest.raises(CredentialsError) as info:
        CredentialStore.load(path)
    message = str(info.value)
    assert path in message
    for part in expected:
        assert part in message
    assert PASSWORD not in message and "s3cr3t" not in message
    return message


@pytest.fixture
def no_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import yaml` raise ImportError, as on a machine without PyYAML.
    monkeypatch.setitem(sys.modules, "yaml", None)


# --- pydlit's own shape ---------------------------------------------------------------------

def test_json_with_registries(tmp_path: Path) -> None:
    token = {"url": "https://auth.example/token?service=reg", "token_type": "Bearer",
             "header": {"X-Api-Key": "k"}, "json": {"username": "u", "password": "p"}}
    store = load(tmp_path, {"registries": {"registry.example:5000": BASIC, "token.example": token}})
    assert store.lookup("https://registry.example:5000/v2") == BASIC
    assert store.lookup("https://token.example") == token
    assert store.hosts == ["registry.example:5000", "token.example"]


def test_a_json_payload_given_as_a_string_is_read_as_the_object_it_holds(tmp_path: Path) -> None:
    # As a request's auth may give it, after the original pydlit's request reference.
    payload = {"username": "u", "password": PASSWORD}
    store = load(tmp_path, {"token.example": {"url": "https://auth.example/token", "json": json.dumps(payload)}})
    assert store.lookup("https://token.example") == {"url": "https://auth.example/token", "json": payload}
    refused(tmp_path, {"token.example": {"url": "https://auth.example/token", "json": f"password={PASSWORD}"}},
            "'token.example'", "auth.json", "JSON object")


def test_json_without_the_registries_wrapper(tmp_path: Path) -> None:
    store = load(tmp_path, {"registry.example:5000": BASIC})
    assert store.lookup("http://registry.example:5000/v2/") == BASIC


def test_entries_are_normalised_as_request_auth_is(tmp_path: Path) -> None:
    store = load(tmp_path, {"reg.example": {"url": "https://auth.example/t", "token_type": "jwt",
                                            "header": "X-Api-Key: abc"}})
    assert store.lookup("https://reg.example") == {
        "url": "https://auth.example/t", "token_type": "JWT", "header": {"X-Api-Key": "abc"}}


def test_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    store = load(tmp_path, f"""
registries:
  registry.example:5000:
    basicauth: {{user: ci-bot, password: "{PASSWORD}"}}
  https://other.example:
    header: "X-Api-Key: abc"
""", name="credentials.yaml")
    assert store.lookup("https://registry.example:5000") == BASIC
    assert store.lookup("https://other.example/v2") == {"header": {"X-Api-Key": "abc"}}


def test_yaml_without_pyyaml_says_what_to_do(tmp_path: Path, no_yaml: None) -> None:
    refused(tmp_path, "registries:\n  reg.example:\n    basicauth: {user: u, password: p}\n",
            "not valid JSON", "pip install pyyaml", "JSON", name="credentials.yaml")


def test_json_needs_no_pyyaml(tmp_path: Path, no_yaml: None) -> None:
    assert load(tmp_path, {"reg.example": BASIC}).lookup("https://reg.example") == BASIC


def test_neither_json_nor_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    message = refused(tmp_path, f'reg.example:\n  basicauth: {{user: u, password: "{PASSWORD}"\n  :: [',
                      "neither valid JSON", "nor valid YAML", "line")
    assert "password" not in message


def test_bad_json_names_the_place_not_the_content(tmp_path: Path, no_yaml: None) -> None:
    message = refused(tmp_path, '{"reg.example": {"basicauth": {"user": "u", "password": "' + PASSWORD + '"}',
                      "line 1")
    assert "password" not in message


# --- Docker's config.json -------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_docker_config(tmp_path: Path) -> None:
    store = load(tmp_path, {
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64(f"hubuser:{PASSWORD}")},
            "registry.example:5000": {"username": "ci-bot", "password": PASSWORD},
            "ghcr.io": {"auth": b64("octo:pa:ss:with:colons")},
        },
        "credsStore": "desktop",
        "HttpHeaders": {"User-Agent": "x"},
    })
    hub = {"basicauth": {"user": "hubuser", "password": PASSWORD}}
    assert store.lookup("https://registry-1.docker.io/v2") == hub
    assert store.lookup("https://docker.io") == hub
    assert store.lookup("https://index.docker.io") == hub
    assert store.lookup("https://registry.example:5000/v2") == BASIC
    assert store.lookup("https://ghcr.io") == {"basicauth": {"user": "octo", "password": "pa:ss:with:colons"}}


def test_docker_identity_token_is_user_token(tmp_path: Path) -> None:
    store = load(tmp_path, {"auths": {"myacr.example": {"auth": b64("00000000:"), "identitytoken": "refresh-tok"}}})
    assert store.lookup("https://myacr.example") == {"basicauth": {"user": "<token>", "password": "refresh-tok"}}


def test_docker_hub_names_the_file_gives_win_over_the_aliases(tmp_path: Path) -> None:
    store = load(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hub:one")},
        "registry-1.docker.io": {"auth": b64("reg1:two")},
    }})
    assert store.lookup("https://registry-1.docker.io/v2")["basicauth"]["user"] == "reg1"
    assert store.lookup("https://docker.io")["basicauth"]["user"] == "hub"


def test_docker_entries_without_usable_credentials_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pydlit.credentials"):
        store = load(tmp_path, {"auths": {
            "helper.example": {},
            "rt.example": {"registrytoken": "tok-SECRET"},
            "ok.example": {"auth": b64("u:p")},
        }, "credHelpers": {"helper.example": "ecr-login"}})
    assert store.lookup("https://helper.example") is None
    assert store.lookup("https://rt.example") is None
    assert store.hosts == ["ok.example"]
    assert "helper.example" in caplog.text and "rt.example" in caplog.text
    assert "tok-SECRET" not in caplog.text


@pytest.mark.parametrize("entry, problem", [
    ({"auth": "%%% not base64 %%%"}, "auth is not base64"),
    ({"auth": b64(f"no-colon-{PASSWORD}")}, "user:password"),
    ({"auth": b64(f":{PASSWORD}")}, "user:password"),
    ({"username": "u", "password": 123}, "password must be a string"),
    ("user:" + PASSWORD, "must be an object"),
])
def test_bad_docker_entries(tmp_path: Path, entry: Any, problem: str) -> None:
    refused(tmp_path, {"auths": {"Registry.Example:5000": entry}}, "registry.example:5000", problem)


def test_docker_auths_must_be_an_object(tmp_path: Path) -> None:
    refused(tmp_path, {"auths": ["reg.example"]}, "'auths' must be an object")


# --- host matching --------------------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "reg.example", "REG.Example", "reg.example:443", "reg.example:80", "https://reg.example",
    "https://reg.example:443/", "http://reg.example", "https://reg.example/v2/",
])
@pytest.mark.parametrize("endpoint", [
    "https://reg.example/v2", "https://REG.EXAMPLE", "https://reg.example:443/v2/", "http://reg.example",
    "http://reg.example:80/v2",
])
def test_default_ports_scheme_and_case_do_not_matter(tmp_path: Path, key: str, endpoint: str) -> None:
    assert load(tmp_path, {key: BASIC}).lookup(endpoint) == BASIC


@pytest.mark.parametrize("key, endpoint", [
    ("reg.example:5000", "https://reg.example/v2"),
    ("reg.example", "https://reg.example:5000/v2"),
    ("reg.example:5000", "https://reg.example:5001"),
    ("reg.example", "https://other.example"),
    ("reg.example", "https://sub.reg.example"),
])
def test_other_ports_and_hosts_do_not_match(tmp_path: Path, key: str, endpoint: str) -> None:
    assert load(tmp_path, {key: BASIC}).lookup(endpoint) is None


def test_ipv6_hosts(tmp_path: Path) -> None:
    store = load(tmp_path, {"[::1]:5000": BASIC})
    assert store.lookup("http://[::1]:5000/v2") == BASIC
    assert host_key("https://[::1]/v2") == "[::1]"


def test_lookup_gives_a_copy(tmp_path: Path) -> None:
    store = load(tmp_path, {"reg.example": BASIC})
    store.lookup("https://reg.example")["basicauth"]["password"] = "changed"
    assert store.lookup("https://reg.example") == BASIC


# --- errors ---------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(CredentialsError, match="cannot read the credentials file .*nope.json"):
        CredentialStore.load(path)


@pytest.mark.parametrize("auth, problem", [
    ({"basicauth": {"user": "u"}}, "'password' is a required property"),
    ({"basicauth": {"user": 7, "password": PASSWORD}}, "auth.basicauth.user: must be a string"),
    ({"basicauth": {"user": "u", "password": PASSWORD, "extra": 1}}, "unknown key 'extra'"),
    ({"basic": {"user": "u", "password": PASSWORD}}, "unknown key 'basic'"),
    ({"url": f"not a url {PASSWORD}"}, "auth.url"),
    ({"token_type": PASSWORD}, "auth.token_type"),
    (PASSWORD, "auth: must be an object"),
    ({}, "holds no credentials"),
])
def test_entry_of_the_wrong_shape(tmp_path: Path, auth: Any, problem: str) -> None:
    message = refused(tmp_path, {"registries": {"https://Reg.Example:5000/v2": auth}}, "reg.example:5000", problem)
    assert "source" not in message


@pytest.mark.parametrize("content, problem", [
    ([{"reg.example": BASIC}], "must hold an object"),
    ("", "is empty"),
    ({"registries": {"reg.example": BASIC}, "reg2.example": BASIC}, "'reg2.example' beside 'registries'"),
    ({"registries": ["reg.example"]}, "'registries' must be an object"),
    ({"reg.example": BASIC, "https://REG.example:443": BASIC}, "names the registry reg.example twice"),
    ({"reg.example:99999": BASIC}, "'reg.example:99999' is not a registry host[:port]"),
    ({"https://": BASIC}, "is not a registry host[:port]"),
    ({f"ci-bot:{PASSWORD}@reg.example:99999": BASIC}, "'reg.example:99999'"),
])
def test_file_of_the_wrong_shape(tmp_path: Path, content: Any, problem: str) -> None:
    refused(tmp_path, content, problem)


def test_yaml_keys_must_be_strings(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    refused(tmp_path, "5000:\n  basicauth: {user: u, password: p}\n", "'5000' is not a string", name="c.yaml")
