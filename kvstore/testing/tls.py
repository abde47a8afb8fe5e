"""Throwaway TLS certificates FOR TESTS: a private CA and the server certificates it signs.

Clients under test trust the CA through ``s3_ca_bundle``, so HTTPS (certificate checks included)
can be exercised on loopback without touching the system trust store. Keys are ECDSA P-256 and
live only in the directory given.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import ssl
from pathlib import Path


class ThrowawayCA:
    """A CA created on the spot; ``ca_file`` is its PEM certificate, for ``s3_ca_bundle``."""

    def __init__(self, directory: str | Path, name: str = "kvstore test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = _builder(self._name, self._key.public_key()).issuer_name(self._name)
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
        self._cert = _sign(builder, self._key)
        self.ca_file = str(self._dir / "ca.pem")
        Path(self.ca_file).write_bytes(_pem(self._cert))
        self._issued = 0

    def issue(self, *hosts: str) -> tuple[str, str]:
        """(certificate file, key file) of a server certificate for ``hosts`` (names, ``*.`` names or IPs)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
        # The names travel in the SAN; a CN is capped at 64 characters and is ignored by clients anyway.
        builder = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvstore test server")]), key.public_key())
                   .issuer_name(self._name)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        self._issued += 1
        cert_file, key_file = self._dir / f"server{self._issued}.pem", self._dir / f"server{self._issued}.key"
        cert_file.write_bytes(_pem(_sign(builder, self._key)))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_file), str(key_file)

    def server_context(self, *hosts: str) -> ssl.SSLContext:
        """A server-side SSLContext presenting a certificate for ``hosts``."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.issue(*hosts))
        return context


def _builder(subject, public_key):
    from cryptography import x509

    now = _dt.datetime.now(_dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2)))


def _sign(builder, key):
    from cryptography.hazmat.primitives import hashes

    return builder.sign(key, hashes.SHA256())


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
