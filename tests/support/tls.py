"""A throwaway certificate authority and one server certificate for 127.0.0.1 and localhost.

Made once per test session (and per benchmark run) in a private directory, so local nginx can
serve HTTPS with the template's own TLS settings and clients can verify it against the CA, as
they would a real one. The server key is RSA on purpose: with an RSA certificate a server that
allowed non-ECDHE key exchange (AES128-SHA, AES128-GCM-SHA256) would really negotiate it, so
the cipher tests can tell the template's profile from nginx's default.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=2)


@dataclass(frozen=True)
class LocalPKI:
    directory: Path
    ca_certificate: Path  # what clients trust
    certificate_chain: Path  # server certificate then the CA (nginx's ssl_certificate)
    private_key: Path  # the server's key (nginx's ssl_certificate_key)

    def client_context(self, *, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A client context that trusts only the test CA (hostname checked against the SANs)."""
        context = ssl.create_default_context(cafile=str(self.ca_certificate))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "streamgate tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_test_pki(directory: Path | None = None) -> LocalPKI:
    """A CA (ECDSA P-256) and a server certificate (RSA 2048) signed by it, written as PEM."""
    directory = Path(directory or tempfile.mkdtemp(prefix="streamgate-pki-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # nginx started as root reads them as root; workers never do
    now = datetime.datetime.now(datetime.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("streamgate test CA"))
        .issuer_name(_name("streamgate test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = LocalPKI(
        directory=directory,
        ca_certificate=directory / "ca.pem",
        certificate_chain=directory / "fullchain.pem",
        private_key=directory / "privkey.pem",
    )
    pki.ca_certificate.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.certificate_chain.write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    pki.private_key.touch(mode=0o600)
    pki.private_key.write_bytes(_pem_key(server_key))
    return pki
