import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from support.certs import make_ca

from pydlit.schema import REQUEST_SCHEMA, RequestError, validate_request

EXAMPLE = Path(__file__).resolve().parent.parent / "example" / "example_request.json"
DIGEST_256 = "sha256:" + "0123456789abcdef" * 4
DIGEST_512 = "sha512:" + "0123456789abcdef" * 8
PEM = make_ca().cert_pem


def base() -> dict:
    return {
        "source": {"endpoint": "http://src:5000/v2", "image": "library/alpine", "ref": "3.20"},
        "targets": [{"endpoint": "http://dst:5000/v2"}],
    }


def error_for(body: object) -> str:
    with pytest.raises(RequestError) as caught:
        validate_request(body)
    assert caught.value.msg == str(caught.value)
    return caught.value.msg


def with_source(**fields: object) -> dict:
    body = base()
    body["source"].update(fields)
    return body


def with_target(**fields: object) -> dict:
    body = base()
    body["targets"][0].update(fields)
    return body


def with_auth(auth: object, where: str = "source") -> dict:
    body = base()
    (body["source"] if where == "source" else body["targets"][0])["auth"] = auth
    return body


# Keywords of the 2020-12 core, applicator, validation and meta-data
# vocabularies that the schema is allowed to use; anything else would be lost
# (or misread) when the schema is embedded in the OpenAPI document.
STANDARD_KEYWORDS = {
    "$schema", "$id", "$ref", "$defs", "title", "description", "default",
    "type", "properties", "additionalProperties", "required", "items",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "propertyNames",
}
SCHEMA_MAPS = {"properties", "$defs"}


def walk_keywords(schema: dict):
    for key, value in schema.items():
        yield key
        if key in SCHEMA_MAPS:
            for sub in value.values():
                yield from walk_keywords(sub)
        elif isinstance(value, dict):
            yield from walk_keywords(value)


def test_schema_is_valid_2020_12_with_standard_keywords_only():
    Draft202012Validator.check_schema(REQUEST_SCHEMA)
    assert set(walk_keywords(REQUEST_SCHEMA)) <= STANDARD_KEYWORDS
    assert {"auth", "target"} <= REQUEST_SCHEMA["$defs"].keys()


def test_plain_validator_accepts_the_example():
    # What an OpenAPI consumer would do with the schema, without our tweaks.
    Draft202012Validator(REQUEST_SCHEMA).validate(json.loads(EXAMPLE.read_text()))


def test_example_validates_and_defaults_are_filled():
    body = json.loads(EXAMPLE.read_text())
    original = copy.deepcopy(body)

    request = validate_request(body)

    assert body == original, "input must not be mutated"
    assert request["source"] == {**original["source"], "verify_tls": False}
    assert request["source"]["endpoint"] == "https://registry-1.docker.io/v2"
    assert request["source"]["auth"]["token_type"] == "Bearer"
    assert request["targets"] == [
        {
            "endpoint": "http://localhost:5000/v2",
            "overwrite": True,
            "verify_tls": False,
            "image": None,
            "ref": None,
        }
    ]


def test_given_values_are_kept():
    body = base()
    body["source"].update(verify_tls=True, ca_cert=PEM)
    body["targets"] = [
        {"endpoint": "https://a.example/v2/", "overwrite": False, "verify_tls": True,
         "image": "mirror/alpine", "ref": DIGEST_256, "ca_cert": PEM},
        {"endpoint": "http://b:5000"},
    ]

    request = validate_request(body)

    assert request["source"]["verify_tls"] is True
    assert request["targets"][0] == body["targets"][0]
    assert request["targets"][1] == {
        "endpoint": "http://b:5000", "overwrite": False, "verify_tls": False,
        "image": None, "ref": None,
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], "request body: must be a JSON object, got an array"),
        ("text", "request body: must be a JSON object, got 'text'"),
        (None, "request body: must be a JSON object, got null"),
        ({"targets": [{"endpoint": "http://d"}]}, "request body: 'source' is a required property"),
        ({"source": base()["source"]}, "request body: 'targets' is a required property"),
        ({**base(), "targets": []}, "targets: must hold at least one target"),
        ({**base(), "targets": {"endpoint": "http://d"}}, "targets: must be an array, got an object"),
        ({**base(), "targets": ["http://d"]}, "targets[0]: must be an object, got 'http://d'"),
        ({**base(), "targets": [{"endpoint": "http://d"}] * 101},
         "targets: must hold at most 100 targets, got 101"),
        ({**base(), "source": "http://src"}, "source: must be an object, got 'http://src'"),
        ({**base(), "sources": {}}, "request body: unknown key 'sources'"),
        ({"source": {"endpoint": "http://s", "ref": "x"}, "targets": [{"endpoint": "http://d"}]},
         "source: 'image' is a required property"),
        ({"source": {"endpoint": "http://s", "image": "x"}, "targets": [{"endpoint": "http://d"}]},
         "source: 'ref' is a required property"),
        ({"source": {"image": "x", "ref": "x"}, "targets": [{"endpoint": "http://d"}]},
         "source: 'endpoint' is a required property"),
        ({**base(), "targets": [{"overwrite": True}]}, "targets[0]: 'endpoint' is a required property"),
        (with_source(imgae="x"), "source: unknown key 'imgae'"),
        (with_target(overwite=True), "targets[0]: unknown key 'overwite'"),
        (with_target(b=1, a=2), "targets[0]: unknown keys 'a', 'b'"),
        (with_auth({"tokn_type": "Bearer"}), "source.auth: unknown key 'tokn_type'"),
        (with_auth({"basicauth": {"user": "u", "password": "p", "pass": "p"}}),
         "source.auth.basicauth: unknown key 'pass'"),
        (with_target(overwrite="yes"), "targets[0].overwrite: must be a boolean, got 'yes'"),
        (with_target(overwrite="true"), "targets[0].overwrite: must be a boolean, got 'true'"),
        (with_target(overwrite=1), "targets[0].overwrite: must be a boolean, got 1"),
        (with_target(verify_tls="false"), "targets[0].verify_tls: must be a boolean, got 'false'"),
        (with_source(verify_tls=None), "source.verify_tls: must be a boolean, got null"),
        (with_source(image="Library/Alpine"), "source.image: must be a repository name"),
        (with_source(image="library//alpine"), "source.image: must be a repository name"),
        (with_source(image="a" * 256), "source.image: must be at most 255 characters, got 256"),
        (with_target(image="-x"), "targets[0].image: must be a repository name"),
        (with_source(image=5), "source.image: must be a string, got 5"),
        (with_source(ref="bad tag"), "source.ref: ref must be a tag or a digest"),
        (with_target(ref="sha256:abc"), "targets[0].ref: ref must be a tag or a digest"),
        (with_source(ca_cert="not a cert"), "source.ca_cert: must be a PEM certificate"),
        (with_target(ca_cert=["x"]), "targets[0].ca_cert: must be a string"),
        (with_source(endpoint="localhost:5000"), "source.endpoint: must be an http:// or https:// URL"),
        (with_target(endpoint="http://d:70000/v2"), "targets[0].endpoint: must have a port between 1 and 65535"),
        (with_target(endpoint="http://d:0"), "targets[0].endpoint: must have a port between 1 and 65535"),
        (with_target(endpoint="http://[1:2:3]:5000"), "targets[0].endpoint: must have a port"),
        (with_auth("token"), "source.auth: must be an object"),
        (with_auth({"token_type": "Basic"}), "source.auth.token_type: must be 'Bearer' or 'JWT'"),
        (with_auth({"url": "ftp://auth/token"}), "source.auth.url: must be an http:// or https:// URL"),
        (with_auth({"header": "Authorization"}),
         "source.auth.header: must be an object of header names to values or a 'Name: value' string"),
        (with_auth({"header": ": value"}), "source.auth.header: must be an object of header names"),
        (with_auth({"header": 7}), "source.auth.header: must be an object or a string"),
        (with_auth({"header": {"Bad Name": "v"}}), "source.auth.header: header names must be HTTP tokens"),
        (with_auth({"header": {"X-Token": 1}}), 'source.auth.header["X-Token"]: must be a string'),
        (with_auth({"header": {"X-Token": "a\r\nInjected: 1"}}),
         'source.auth.header["X-Token"]: must not contain line breaks'),
        (with_auth({"json": 7}), "source.auth.json: must be an object or a string"),
        (with_auth({"json": "payload"}, where="target"),
         "targets[0].auth.json: must be a JSON object or a string holding one, and this string holds no JSON object"),
        (with_auth({"json": '["not", "an", "object"]'}),
         "source.auth.json: must be a JSON object or a string holding one, and this string holds no JSON object"),
        (with_auth({"basicauth": {"user": "u"}}), "source.auth.basicauth: 'password' is a required property"),
        (with_auth({"basicauth": {"password": "p"}}), "source.auth.basicauth: 'user' is a required property"),
        (with_auth({"basicauth": {"user": "", "password": "p"}}), "source.auth.basicauth.user: must not be empty"),
        (with_auth({"basicauth": {"user": "u", "password": 12345678}}),
         "source.auth.basicauth.password: must be a string"),
        (with_auth({"basicauth": "u:p"}, where="target"), "targets[0].auth.basicauth: must be an object"),
    ],
)
def test_bad_input_names_the_path(body, expected):
    assert expected in error_for(body)


@pytest.mark.parametrize(
    "auth",
    [
        {"basicauth": {"user": "u", "password": 876543219}},
        {"basicauth": {"user": 876543219, "password": "p"}},
        {"header": {"X-Api-Key": 876543219}},
        {"header": {"X-Api-Key": "secret-876543219\n"}},
        {"header": "X-Api-Key secret-876543219"},
        {"json": "secret-876543219"},
        {"url": "https://auth/token?password=secret-876543219#x"},
        {"token_type": "secret-876543219"},
    ],
)
@pytest.mark.parametrize("where", ["source", "target"])
def test_secrets_are_never_echoed(auth, where):
    message = error_for(with_auth(auth, where))
    assert "auth" in message
    assert "876543219" not in message


@pytest.mark.parametrize("where", ["source", "target"])
def test_a_ca_cert_that_looks_like_pem_but_cannot_be_loaded_is_refused_now(where):
    # It used to be taken, and its job failed when it ran, naming no location.
    fake = "-----BEGIN CERTIFICATE-----\nMIIBnotacert876543219\n-----END CERTIFICATE-----\n"
    body = with_source(ca_cert=fake) if where == "source" else with_target(ca_cert=fake)
    message = error_for(body)
    assert message == f"{'source' if where == 'source' else 'targets[0]'}.ca_cert: must be a PEM certificate that can be loaded"


def test_ca_cert_is_not_echoed():
    # A private key pasted in place of the CA certificate.
    message = error_for(with_source(ca_cert="-----BEGIN PRIVATE KEY-----\nsecret876543219"))
    assert "source.ca_cert" in message
    assert "876543219" not in message


@pytest.mark.parametrize("endpoint", [
    "http://user:secret876543219@localhost:5000/v2",
    "https://secret876543219@registry.example",
    "user:secret876543219@localhost:5000",
    "https://user:pa/ss#?876543219@reg.example:5000",  # what no URL parser reads as a password
    "https://user:a@b876543219@reg.example",
])
def test_a_password_in_an_endpoint_is_not_echoed(endpoint):
    message = error_for(with_source(endpoint=endpoint))
    assert message.startswith("source.endpoint: ") and "***@" in message
    assert "876543219" not in message


def test_container_values_are_not_echoed():
    body = base()
    body["targets"] = {"auth": {"basicauth": {"user": "u", "password": "secret876543219"}}}
    assert "876543219" not in error_for(body)


def test_long_values_are_truncated():
    message = error_for(with_target(overwrite="x" * (1 << 20)))
    assert message.startswith("targets[0].overwrite: must be a boolean, got 'xxx")
    assert len(message) < 200
    assert str(1 << 20) in message

    message = error_for(with_source(endpoint="http://" + "h" * (1 << 20)))
    assert len(message) < 200


def test_long_unknown_keys_are_truncated():
    message = error_for(with_source(**{"k" * 10_000: 1}))
    assert message.startswith("source: unknown key 'kkk")
    assert len(message) < 200


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("X-Api-Key: abc", {"X-Api-Key": "abc"}),
        ("X-Api-Key:abc", {"X-Api-Key": "abc"}),
        ("Authorization:  Bearer a:b  ", {"Authorization": "Bearer a:b"}),
        ("X-Empty:", {"X-Empty": ""}),
        ({"X-A": "1", "X-B": "2"}, {"X-A": "1", "X-B": "2"}),
        ({}, {}),
    ],
)
def test_header_is_normalised_to_an_object(header, expected):
    request = validate_request(with_auth({"header": header}, where="target"))
    assert request["targets"][0]["auth"]["header"] == expected


@pytest.mark.parametrize(
    ("token_type", "expected"),
    [("Bearer", "Bearer"), ("bearer", "Bearer"), ("BEARER", "Bearer"),
     ("JWT", "JWT"), ("jwt", "JWT"), ("Jwt", "JWT")],
)
def test_token_type_is_normalised(token_type, expected):
    request = validate_request(with_auth({"url": "https://auth/token", "token_type": token_type}))
    assert request["source"]["auth"] == {"url": "https://auth/token", "token_type": expected}


@pytest.mark.parametrize("where", ["source", "target"])
def test_an_auth_json_string_holding_an_object_is_that_object(where):
    # The original pydlit's request reference shows `"json": "<...put it here.>"`: a string.
    payload = {"client_id": "pydlit", "secret": "s3cr3t", "nested": {"a": [1, 2]}}
    request = validate_request(with_auth({"url": "https://auth/token", "json": json.dumps(payload)}, where))
    side = request["source"] if where == "source" else request["targets"][0]
    assert side["auth"] == {"url": "https://auth/token", "json": payload}


@pytest.mark.parametrize(
    "text",
    ['{"password": "secret-876543219"', "secret-876543219", '"secret-876543219"', "", "[" * 5000],
    ids=["unfinished-object", "not-json", "json-string", "empty", "nested-too-deeply"],
)
def test_an_auth_json_string_without_an_object_is_refused_unechoed(text):
    message = error_for(with_auth({"json": text}))
    assert message.startswith("source.auth.json: must be a JSON object or a string holding one")
    assert "876543219" not in message


def test_full_auth_block_is_accepted():
    auth = {
        "url": "https://auth.example/token?service=reg&scope=repository:a/b:pull,push",
        "token_type": "JWT",
        "header": {"X-Tenant": "t1"},
        "json": {"client_id": "pydlit", "nested": {"a": [1, 2]}},
        "basicauth": {"user": "robot", "password": ""},
    }
    assert validate_request(with_auth(auth, where="target"))["targets"][0]["auth"] == auth


@pytest.mark.parametrize(
    "ref",
    ["latest", "3.20", "v1.0.0-rc_1", "_x", "A" * 128, DIGEST_256, DIGEST_512],
)
def test_tags_and_digests_are_accepted(ref):
    assert validate_request(with_source(ref=ref))["source"]["ref"] == ref
    assert validate_request(with_target(ref=ref))["targets"][0]["ref"] == ref


@pytest.mark.parametrize(
    "ref",
    [
        "", ".hidden", "-x", "A" * 129, "has space", "tag:colon", "latest\n",
        "sha256:" + "0" * 63, "sha256:" + "A" * 64, "sha512:" + "0" * 64, "md5:" + "0" * 32,
    ],
)
def test_bad_refs_are_rejected(ref):
    assert "source.ref: ref must be a tag or a digest" in error_for(with_source(ref=ref))


@pytest.mark.parametrize(
    "image",
    ["alpine", "library/hello-world", "a/b/c", "my.org/some_repo", "a__b", "a--b", "x" * 255],
)
def test_repository_names_are_accepted(image):
    assert validate_request(with_target(image=image))["targets"][0]["image"] == image


@pytest.mark.parametrize(
    "image", ["", "Alpine", "a/", "/a", "a_", "a___b", "a b", "alpine:latest", "alpine\n"]
)
def test_bad_repository_names_are_rejected(image):
    assert "targets[0].image: must be a repository name" in error_for(with_target(image=image))


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://localhost:5000/v2",
        "http://localhost:5000/v2/",
        "http://localhost:5000",
        "https://registry-1.docker.io/v2",
        "http://127.0.0.1:5000/",
        "https://registry.example.com/mirror/v2",
        "http://[::1]:5000/v2",
        "http://registry_1:65535",
    ],
)
def test_endpoint_forms_are_accepted_and_kept_verbatim(endpoint):
    body = with_source(endpoint=endpoint)
    body["targets"][0].update(endpoint=endpoint, image="mirror/app")
    request = validate_request(body)
    assert request["source"]["endpoint"] == endpoint
    assert request["targets"][0]["endpoint"] == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "localhost:5000",
        "ftp://x/v2",
        "http:///v2",
        "http://host:5000/v2?x=1",
        "http://host/v2#frag",
        "http://user:pass@host/v2",
        "http://host name/v2",
        "http://host/v 2",
        "http://host:port/v2",
        "HTTP://host/v2",
        "http://host/v2\n",
        "",
    ],
)
def test_bad_endpoints_are_rejected(endpoint):
    message = error_for(with_target(endpoint=endpoint))
    assert message.startswith("targets[0].endpoint: must be an http:// or https:// URL")


def test_shallowest_then_first_error_is_reported():
    body = base()
    body["targets"] = [
        {"endpoint": "http://a", "overwrite": "yes"},
        {"endpoint": "http://b"},
        {"endpoint": "http://c", "overwrite": "no"},
    ]
    assert error_for(body).startswith("targets[0].overwrite:")

    body["source"]["ref"] = "bad ref"
    assert error_for(body).startswith("source.ref:")

    del body["source"]["image"]
    assert error_for(body) == "source: 'image' is a required property"


def test_error_does_not_depend_on_key_order():
    body = {
        "targets": [{"verify_tls": "x", "endpoint": "http://d"}],
        "source": {"ref": "bad ref", "image": "BAD", "endpoint": "http://s"},
    }
    reordered = {
        "source": dict(reversed(list(body["source"].items()))),
        "targets": [dict(reversed(list(body["targets"][0].items())))],
    }
    assert error_for(body) == error_for(reordered)


@pytest.mark.parametrize("targets, said", [
    ([{"endpoint": "http://localhost:5000/v2/"}], "targets[0]: the same repository and ref as the source"),
    ([{"endpoint": "http://LOCALHOST:5000", "image": "team/app", "ref": "v1"}], "targets[0]: the same repository and ref as the source"),
    ([{"endpoint": "http://b:5000"}, {"endpoint": "http://b:5000/v2"}], "targets[1]: the same repository and ref as targets[0]"),
    ([{"endpoint": "http://b:5000", "ref": "v2"}, {"endpoint": "http://b:5000", "image": "team/app", "ref": "v2"}],
     "targets[1]: the same repository and ref as targets[0]"),
    # On Docker Hub a one-part name is under library/.
    ([{"endpoint": "https://registry-1.docker.io/v2", "image": "hello-world"},
      {"endpoint": "https://registry-1.docker.io", "image": "library/hello-world"}],
     "targets[1]: the same repository and ref as targets[0]"),
])
def test_a_target_leading_where_another_or_the_source_is_refused(targets, said):
    body = {"source": {"endpoint": "http://localhost:5000", "image": "team/app", "ref": "v1"}, "targets": targets}
    assert error_for(body) == said


def test_targets_differing_in_registry_repository_or_ref_are_taken():
    body = {"source": {"endpoint": "http://a:5000", "image": "team/app", "ref": "v1"},
            "targets": [{"endpoint": "http://b:5000"}, {"endpoint": "http://b:5000", "ref": "v2"},
                        {"endpoint": "http://b:5000", "image": "mirror/app"}, {"endpoint": "http://a:5000", "ref": "v2"},
                        {"endpoint": "http://b:5000/prefix"},
                        # library/ is Docker Hub's alone: elsewhere these are two repositories.
                        {"endpoint": "http://c:5000", "image": "app"}, {"endpoint": "http://c:5000", "image": "library/app"}]}
    assert len(validate_request(body)["targets"]) == 7


def test_a_target_digest_other_than_the_source_digest_is_refused():
    src, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    body = {"source": {"endpoint": "http://a:5000", "image": "team/app", "ref": src},
            "targets": [{"endpoint": "http://b:5000", "ref": other}]}
    assert error_for(body) == (f"targets[0].ref: {other} is not the source's digest {src}: a manifest is pushed under "
                               "its own digest only (name a tag, or no ref)")
    body["targets"][0]["ref"] = "sha256"  # a tag, whatever it looks like
    assert validate_request(body)["targets"][0]["ref"] == "sha256"
