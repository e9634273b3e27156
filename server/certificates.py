"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate signed by
it, and one authentication key pair per SuperNode (the format Flower 1.41 and 1.42 expect: EC
P-384, the private key in OpenSSH format, the public key as one OpenSSH line)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.files import write_atomic

VALID_DAYS = 365


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, nodes: int, hosts: list[str]) -> dict[str, Path]:
    """CA + SuperLink certificate (valid for `hosts`: names or IP addresses) + node keys."""
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca-cert": out / "ca.crt", "ca-key": out / "ca.key", "superlink-cert": out / "superlink.crt",
             "superlink-key": out / "superlink.key"}
    write_atomic(paths["ca-key"], _pem_key(ca_key), private=True)
    write_atomic(paths["ca-cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(paths["superlink-key"], _pem_key(server_key), private=True)
    write_atomic(paths["superlink-cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        paths[f"node-{i}-key"] = out / "nodes" / f"node-{i}"
        paths[f"node-{i}-pub"] = out / "nodes" / f"node-{i}.pub"
        write_atomic(paths[f"node-{i}-key"], private, private=True)
        write_atomic(paths[f"node-{i}-pub"], public + b"\n")
    return paths
