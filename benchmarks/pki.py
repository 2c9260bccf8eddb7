"""Certificates for the TLS variants: one CA (trustme), one certificate for `localhost` and
127.0.0.1, used by every target's listener and by the TLS backend alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate, PEM
    cert: Path  # leaf certificate chain, PEM
    key: Path  # leaf private key, PEM
    combined: Path  # chain + key in one file (HAProxy's `crt`)


def make_pki(directory: Path, notes: list[str]) -> Pki | None:
    try:
        import trustme
    except ImportError:
        notes.append("trustme is not installed: the TLS variants are skipped")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    pki = Pki(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        combined=directory / "combined.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca))
    leaf.private_key_pem.write_to_path(str(pki.key))
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    pki.cert.write_bytes(chain)
    pki.combined.write_bytes(chain + leaf.private_key_pem.bytes())
    for path in (pki.ca, pki.cert, pki.key, pki.combined):
        path.chmod(0o644)  # Apache and nginx workers may read them after dropping root
    return pki
