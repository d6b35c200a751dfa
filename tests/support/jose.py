"""The bits of JOSE the tests need, on `cryptography` alone: RS256 JWTs for the token server and
libtrust-style JWS signatures for schema1 manifests."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sign_jwt(key: rsa.RSAPrivateKey, cert_der: bytes, claims: dict[str, Any]) -> str:
    """RS256 JWT whose `x5c` header carries the signing certificate (standard, not url, base64)."""
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def decode_jwt_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, claims, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


# -- schema1 (libtrust "pretty" JWS) ------------------------------------------------------------


def _libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    # libtrust: SHA-256 of the PKIX DER, first 240 bits, base32, groups of four joined by ':'.
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def sign_schema1(payload: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """Append a libtrust ES256 signature block to an (unsigned) schema1 manifest.

    The registry's digest of a schema1 manifest is the sha256 of `payload` (the canonical part),
    not of the signed document returned here.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    close = len(payload.rstrip())
    if not payload[:close].endswith(b"}"):
        raise ValueError("schema1 payload must be a JSON object")
    format_length = len(payload[: close - 1].rstrip())
    protected = b64url(
        _json(
            {
                "formatLength": format_length,
                "formatTail": b64url(payload[format_length:]),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    )
    signing_input = f"{protected}.{b64url(payload)}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    numbers = key.public_key().public_numbers()
    jwk = {
        "crv": "P-256",
        "kid": _libtrust_key_id(key.public_key()),
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    signatures = [
        {
            "header": {"jwk": jwk, "alg": "ES256"},
            "signature": b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
            "protected": protected,
        }
    ]
    block = json.dumps(signatures, indent=3).replace("\n", "\n   ")
    return payload[:format_length] + b',\n   "signatures": ' + block.encode() + b"\n}"


def schema1_canonical(signed: bytes) -> bytes:
    """The canonical payload of a signed schema1 manifest (what its digest is computed over)."""
    doc = json.loads(signed)
    protected = json.loads(b64url_decode(doc["signatures"][0]["protected"]))
    length = int(protected["formatLength"])
    return signed[:length] + b64url_decode(protected["formatTail"])
