"""Self-tests of the test-support layer: each would fail if the helper it covers were broken."""

from __future__ import annotations

import base64
import json
import re
import ssl
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from support import mediatypes as mt
from support.images import (
    KINDS,
    Image,
    assert_same_tree,
    manifest_digest,
    push_image,
    read_back,
    sha256_digest,
    shared_layer_images,
)
from support.jose import decode_jwt_unverified
from support.regclient import RegistryError, RegistryHTTP, Response
from support.service import ServiceProcess, job_body, job_state


def test_oci_index_reads_back_identically(registries, repo_name):
    reg = registries.source
    image = push_image(reg, repo_name, "v1", "oci_index", platforms=3)

    tree = read_back(reg, repo_name, "v1")
    assert_same_tree(image, tree)
    assert tree.media_type == mt.OCI_INDEX
    assert len(tree.manifests) == 4  # index + 3 children
    assert manifest_digest(reg, repo_name, "v1") == image.digest
    assert manifest_digest(reg, repo_name, "nope") is None
    # indent=3 makes any re-serialisation by a copier visible as a digest change.
    assert b'\n   "manifests"' in image.manifest_bytes
    children = [json.loads(b) for b in tree.manifests.values() if b != image.manifest_bytes]
    layer_sets = [{layer["digest"] for layer in c["layers"]} for c in children]
    assert len(set.intersection(*layer_sets)) == 1, "exactly one layer shared by all platforms"
    assert len({c["config"]["digest"] for c in children}) == 3

    with pytest.raises(AssertionError):
        tampered = dict(tree.manifests)
        tampered[image.digest] = image.manifest_bytes + b" "
        assert_same_tree(image, replace(tree, manifests=tampered))
    with pytest.raises(AssertionError):
        assert_same_tree(image, replace(tree, blobs={**tree.blobs, "sha256:" + "0" * 64: 1}))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "oci_index"])
def test_every_image_kind_round_trips(registries, repo_name, kind):
    reg = registries.schema1_source if kind == "schema1" else registries.source
    image = push_image(reg, repo_name, "t", kind, platforms=2)
    assert_same_tree(image, read_back(reg, repo_name, "t"))
    if kind == "foreign":
        assert len(image.foreign) == 1 and not image.foreign.keys() & image.blobs.keys()


def test_shared_layer_images_differ_in_one_layer(registries, repo_name):
    first, second = shared_layer_images(
        registries.source, repo_name, layer_sizes=[1000, 2000, 3000]
    )
    layers = [set(json.loads(i.manifest_bytes)["layers"][n]["digest"] for n in range(3))
              for i in (first, second)]
    assert len(layers[0] & layers[1]) == 2
    assert first.digest != second.digest


def test_registry_restart_keeps_port_storage_and_upload_sessions(registry_factory, repo_name):
    reg = registry_factory("plain")
    image = push_image(reg, repo_name, "v1", "oci")
    client = RegistryHTTP(reg.url)
    started = client.request("POST", f"/v2/{repo_name}/blobs/uploads/", expect=(202,))
    patched = client.request("PATCH", started.header("Location"), body=b"x" * 1000,
                             headers={"Content-Range": "0-999"}, expect=(202,))
    old_url = reg.url
    reg.restart()
    assert reg.url == old_url
    assert manifest_digest(reg, repo_name, "v1") == image.digest
    resumed = client.request("GET", patched.header("Location"))
    assert (resumed.status, resumed.header("Range")) == (204, "0-999")


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_token_registry_refuses_anonymous_push_and_accepts_user_token(registries, repo_name):
    reg, tokens = registries.token, registries.token_server
    anonymous = RegistryHTTP(reg.url)
    assert anonymous.request("GET", f"/v2/{repo_name}/tags/list").status == 404  # pull allowed
    assert anonymous.request("POST", f"/v2/{repo_name}/blobs/uploads/").status == 401
    refused = tokens.requests[-1]
    assert refused.user is None and refused.granted[0]["actions"] == ["pull"]

    tokens.clear_requests()
    image = push_image(reg, repo_name, "v1", "schema2")
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    pushes = [r for r in tokens.requests if any("push" in s for s in r.scopes)]
    assert pushes and all(r.user == reg.user and r.status == 200 for r in pushes)
    assert set(pushes[0].granted[0]["actions"]) == {"pull", "push"}

    # Several scopes in one value, a name with ':' inside (split from the right), and a grant
    # of less than asked: all without an error.
    tokens.set_acl("ro", [("*", ["pull"])])
    tokens.users["ro"] = "ro-pass"
    try:
        query = urllib.parse.urlencode({
            "service": tokens.service,
            "scope": f"repository:{repo_name}:pull,push repository:host:5000/x:pull",
        })
        with urllib.request.urlopen(urllib.request.Request(
            f"{tokens.realm}?{query}", headers=_basic("ro", "ro-pass")
        )) as resp:
            answer = json.load(resp)
    finally:
        del tokens.users["ro"]
        tokens.reset_acl()
    _, claims = decode_jwt_unverified(answer["access_token"])
    assert claims["aud"] == tokens.service and isinstance(claims["exp"], int)
    assert claims["access"] == [
        {"type": "repository", "name": repo_name, "actions": ["pull"]},
        {"type": "repository", "name": "host:5000/x", "actions": ["pull"]},
    ]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(
            urllib.request.Request(tokens.realm, headers=_basic(reg.user, "bad"))
        )
    assert err.value.code == 401
    err.value.close()

    # The original pydlit "url" auth style: JSON credentials, token used as a Bearer.
    url = tokens.auth_json_url(f"repository:{repo_name}:pull")
    body = json.dumps({"username": reg.user, "password": reg.password}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as resp:
        token = json.load(resp)["token"]
    pulled = RegistryHTTP(reg.url).request(
        "GET", f"/v2/{repo_name}/manifests/v1",
        headers={"Authorization": f"Bearer {token}", "Accept": mt.ACCEPT_ALL},
    )
    assert pulled.status == 200 and pulled.body == image.manifest_bytes


def test_proxy_counts_bytes_rewrites_location_and_injects_faults(
    registries, proxy_factory, repo_name
):
    proxy = proxy_factory(registries.target_a)
    image = push_image(proxy, repo_name, "v1", "schema2")
    assert proxy.blob_upload_bytes() == image.total_bytes
    assert proxy.uploaded_bytes("PUT", kinds="manifest_put") == len(image.manifest_bytes)
    assert proxy.count("PUT", "manifest_put") == 1
    assert proxy.count("POST", "upload_post") == len(image.blobs)

    client = RegistryHTTP(proxy.url)
    started = client.request("POST", f"/v2/{repo_name}/blobs/uploads/", expect=(202,))
    assert started.header("Location").startswith(proxy.url + "/v2/")

    proxy.fail_next(1, 503, kinds="manifest_get", retry_after=2)
    accept = {"Accept": mt.ACCEPT_ALL}
    failed = client.request("GET", f"/v2/{repo_name}/manifests/v1", headers=accept)
    assert failed.status == 503 and failed.header("Retry-After") == "2"
    assert failed.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert client.request("GET", f"/v2/{repo_name}/manifests/v1", headers=accept).status == 200

    proxy.reset_counters()
    layer = max(image.blobs, key=image.blobs.__getitem__)
    proxy.cut_download_after(1000)
    with pytest.raises(AssertionError):
        client.read_blob(repo_name, layer)
    assert client.read_blob(repo_name, layer) == image.blobs[layer]
    assert proxy.downloaded_bytes() == 1000 + image.blobs[layer]


SIG = "application/vnd.example.sig"
SBOM = "application/vnd.example.sbom"
EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"


def _push_referrer(
    client: RegistryHTTP, repo: str, subject: Image, payload: bytes, *,
    artifact_type: str | None = SIG, config_type: str = EMPTY_CONFIG_TYPE,
    annotations: dict[str, str] | None = None,
) -> tuple[Response, bytes]:
    """PUT (by digest) an OCI artifact manifest of one `payload` layer naming `subject`.

    Returns the PUT's response and the manifest's bytes."""
    for blob in (b"{}", payload):
        client.upload_monolithic(repo, blob, sha256_digest(blob))
    manifest: dict[str, object] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST}
    if artifact_type is not None:
        manifest["artifactType"] = artifact_type
    manifest |= {
        "config": {"mediaType": config_type, "digest": sha256_digest(b"{}"), "size": 2},
        "layers": [{"mediaType": artifact_type or "application/octet-stream",
                    "digest": sha256_digest(payload), "size": len(payload)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": len(subject.manifest_bytes)},
    }
    if annotations is not None:
        manifest["annotations"] = annotations
    data = json.dumps(manifest).encode()
    put = client.request("PUT", f"/v2/{repo}/manifests/{sha256_digest(data)}",
                         headers={"Content-Type": mt.OCI_MANIFEST}, body=data, expect=(201,))
    return put, data


def _referrer_pages(client: RegistryHTTP, url: str) -> tuple[list[list[str]], list[str]]:
    """GET url and every `Link: rel="next"` after it: (digests listed by page, links followed)."""
    pages, links = [], []
    while True:
        resp = client.request("GET", url, expect=(200,))
        pages.append([d["digest"] for d in resp.json()["manifests"]])
        link = resp.header("Link")
        if link is None:
            return pages, links
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        assert match, link
        url = match[1]
        links.append(url)


def test_proxy_referrers_api_records_subjects_and_lists_them(
    registries, proxy_factory, repo_name
):
    proxy = proxy_factory(registries.target_a)
    proxy.referrers_api = True
    subject = push_image(proxy, repo_name, "v1", "oci")
    client = RegistryHTTP(proxy.url)
    put, data = _push_referrer(client, repo_name, subject, b"signature", annotations={"a": "b"})
    digest = sha256_digest(data)
    assert put.header("OCI-Subject") == subject.digest
    assert put.header("Docker-Content-Digest") == digest
    assert RegistryHTTP(registries.target_a.url).get_manifest(repo_name, digest)[1] == data
    again = client.request("PUT", f"/v2/{repo_name}/manifests/v1", body=subject.manifest_bytes,
                           headers={"Content-Type": subject.media_type}, expect=(201,))
    assert again.header("OCI-Subject") is None  # no subject, nothing recorded

    path = f"/v2/{repo_name}/referrers/{subject.digest}"
    listed = client.request("GET", path, expect=(200,))
    assert listed.header("Content-Type") == mt.OCI_INDEX
    assert listed.header("OCI-Filters-Applied") is None and listed.header("Link") is None
    expected = {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(data),
                "artifactType": SIG, "annotations": {"a": "b"}}
    assert listed.json() == {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                             "manifests": [expected]}
    assert (proxy.requests[-1].method, proxy.requests[-1].kind) == ("GET", "other")
    assert (proxy.requests[-1].path, proxy.requests[-1].status) == (path, 200)

    # Pushed again: listed once. Another subject or repository: none.
    _, same = _push_referrer(client, repo_name, subject, b"signature", annotations={"a": "b"})
    assert same == data
    assert client.request("GET", path).json()["manifests"] == [expected]
    other = f"/v2/{repo_name}/referrers/sha256:{'0' * 64}"
    assert client.request("GET", other, expect=(200,)).json()["manifests"] == []
    elsewhere = f"/v2/{repo_name}-x/referrers/{subject.digest}"
    assert client.request("GET", elsewhere, expect=(200,)).json()["manifests"] == []

    proxy.clear_faults()
    assert client.request("GET", path).json()["manifests"] == [expected]
    proxy.reset_referrers()
    assert client.request("GET", path).json()["manifests"] == []


def test_proxy_referrers_api_filters_by_artifact_type(registries, proxy_factory, repo_name):
    proxy = proxy_factory(registries.target_a)
    proxy.referrers_api = True
    subject = push_image(proxy, repo_name, "v1", "oci")
    client = RegistryHTTP(proxy.url)
    sig = sha256_digest(_push_referrer(client, repo_name, subject, b"signature")[1])
    # Without an artifactType the config's media type stands in for it, as the spec says.
    sbom = sha256_digest(_push_referrer(client, repo_name, subject, b"sbom", artifact_type=None,
                                        config_type=SBOM)[1])

    path = f"/v2/{repo_name}/referrers/{subject.digest}"
    listed = client.request("GET", path).json()["manifests"]
    assert [(d["digest"], d["artifactType"]) for d in listed] == [(sig, SIG), (sbom, SBOM)]
    assert not any("annotations" in d for d in listed)
    for artifact_type, digests in ((SBOM, [sbom]), (SIG, [sig]), ("application/x-none", [])):
        query = urllib.parse.urlencode({"artifactType": artifact_type})
        filtered = client.request("GET", f"{path}?{query}", expect=(200,))
        assert filtered.header("OCI-Filters-Applied") == "artifactType"
        assert [d["digest"] for d in filtered.json()["manifests"]] == digests


def test_proxy_referrers_api_pages_with_link(registries, proxy_factory, repo_name):
    proxy = proxy_factory(registries.target_a)
    proxy.referrers_api = True
    proxy.referrers_page_size = 1
    subject = push_image(proxy, repo_name, "v1", "oci")
    client = RegistryHTTP(proxy.url)
    sigs = [sha256_digest(_push_referrer(client, repo_name, subject, p)[1]) for p in (b"1", b"2")]
    sbom = sha256_digest(_push_referrer(client, repo_name, subject, b"3", artifact_type=SBOM)[1])

    path = f"/v2/{repo_name}/referrers/{subject.digest}"
    pages, links = _referrer_pages(client, path)
    assert pages == [[sigs[0]], [sigs[1]], [sbom]]
    assert links == [f"{path}?page=1", f"{path}?page=2"]
    pages, links = _referrer_pages(client, f"{path}?artifactType={SIG}")
    assert pages == [[sigs[0]], [sigs[1]]]
    assert links == [f"{path}?page=1&artifactType=application%2Fvnd.example.sig"]
    proxy.referrers_page_size = 3
    assert _referrer_pages(client, path) == ([[*sigs, sbom]], [])


def test_proxy_without_referrers_api_passes_referrers_through(
    registries, proxy_factory, repo_name
):
    proxy = proxy_factory(registries.target_a)
    subject = push_image(proxy, repo_name, "v1", "oci")
    client = RegistryHTTP(proxy.url)
    put, _ = _push_referrer(client, repo_name, subject, b"signature")
    assert put.header("OCI-Subject") is None  # distribution 2.8 stores it, subject ignored
    path = f"/v2/{repo_name}/referrers/{subject.digest}"
    missing = client.request("GET", path)
    assert missing.status == 404 and missing.body.startswith(b"404 page not found")
    assert (proxy.requests[-1].kind, proxy.requests[-1].status) == ("other", 404)
    proxy.referrers_api = True
    assert client.request("GET", path, expect=(200,)).json()["manifests"] == []  # not recorded


def test_tls_registry_needs_its_ca_and_credentials(registries, repo_name):
    reg = registries.tls
    assert reg.url.startswith("https://") and reg.ca_pem
    context = ssl.create_default_context(cadata=reg.ca_pem)
    for host in ("127.0.0.1", "localhost"):  # IP SAN and DNS SAN
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"https://{host}:{reg.port}/v2/", context=context, timeout=5)
        assert err.value.code == 401
        assert err.value.headers["WWW-Authenticate"].startswith("Basic ")
        err.value.close()
    with pytest.raises(urllib.error.URLError) as no_ca:
        urllib.request.urlopen(reg.url + "/v2/", timeout=5)
    assert isinstance(no_ca.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises(RegistryError):
        RegistryHTTP(reg.url, ca_pem=reg.ca_pem, user=reg.user, password="wrong").request(
            "POST", f"/v2/{repo_name}/blobs/uploads/", expect=(202,))
    image = push_image(reg, repo_name, "v1", "docker_list", platforms=2)
    assert_same_tree(image, read_back(reg, repo_name, "v1"))
    assert reg.request_auth == {"basicauth": {"user": reg.user, "password": reg.password}}


FAKE_SERVICE = textwrap.dedent('''
    """Stands in for pydlit: the same CLI and API surface, no work done."""
    import argparse, json, signal, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    polls = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                return self.answer(200, {"status": "ok"})
            job = self.path.rsplit("/", 1)[-1]
            polls[job] = polls.get(job, 0) + 1
            self.answer(200, {"value": "FINISHED" if polls[job] > 2 else "RUNNING"})

        def do_POST(self):
            try:
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            except ValueError:
                return self.answer(400, {"status": "error", "msg": "invalid JSON"})
            self.answer(201, {"id": "job-1", "msg": "Image sync started", "status": "success"})

    parser = argparse.ArgumentParser()
    for flag in ("--host", "--port", "--db"):
        parser.add_argument(flag)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, int(args.port)), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    print("fake service up", flush=True)
    server.serve_forever()
''')


def test_service_process_drives_a_service(tmp_path: Path, registries):
    (tmp_path / "fakepydlit.py").write_text(FAKE_SERVICE)
    proc = ServiceProcess(tmp_path / "run", {"PYTHONPATH": str(tmp_path)}, module="fakepydlit")
    with proc:
        targets = [registries.target_a, (registries.tls, {"overwrite": True})]
        body = job_body(registries.tls, "a/b", "v1", targets)
        assert body["source"]["auth"] == registries.tls.request_auth
        assert "auth" not in body["targets"][0] and body["targets"][1]["overwrite"] is True
        job = proc.submit(body)
        assert job_state(proc.wait(job, timeout=5)) == "FINISHED"
        assert proc.post_raw(b"{not json")[0] == 400
        assert proc.stop() == 3
    assert "fake service up" in proc.log_text()
