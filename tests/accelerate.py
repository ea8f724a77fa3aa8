"""AWS's S3 Transfer Acceleration endpoint as it answers for a bucket without acceleration
(400 InvalidRequest to every request), over HTTPS on 127.0.0.1:443 with a certificate for
`<bucket>.s3-accelerate.amazonaws.com` from a CA made for the test. It runs, with syncd, in a
network and mount namespace of their own where that name is 127.0.0.1: `reach(bucket, folder,
script)` is the command that does it."""

from __future__ import annotations

import datetime
import http.server
import shlex
import ssl
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MESSAGE = "S3 Transfer Acceleration is not configured on this bucket"
ANSWER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidRequest</Code>'
    f"<Message>{MESSAGE}</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"
).encode()


def host(bucket: str) -> str:
    return f"{bucket}.s3-accelerate.amazonaws.com"


def certificates(name: str, folder: Path) -> None:
    """ca.pem, and cert.pem with key.pem for `name`, in `folder`."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncd tests CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


ENTER = """set -e
ip link set lo up
printf '127.0.0.1 localhost\\n127.0.0.1 %s\\n' "$2" > "$1/hosts"
mount --bind "$1/hosts" /etc/hosts
{python} -m tests.accelerate "$1" &
trap "kill $! 2>/dev/null" EXIT
until {python} -c 'import socket; socket.create_connection(("127.0.0.1", 443), 1)' 2>/dev/null
do sleep 0.05; done
export SSL_CERT_FILE="$1/ca.pem" AWS_CA_BUNDLE="$1/ca.pem"
bash -c "$3"
"""


def at_aws_defaults(folder: Path, rust: bool, **syncd: Any) -> tuple[Path, Path]:
    """A one-file result `exec_1_aaaaaaaa` and a config for the bucket `results` at AWS's
    defaults (acceleration on), in `folder`: the result's folder and the config file."""
    outputs = folder / "outputs"
    (outputs / "exec_1_aaaaaaaa").mkdir(parents=True)
    (outputs / "exec_1_aaaaaaaa" / "a.bin").write_bytes(b"a")
    config = folder / "config.yaml"
    settings = {"outputs_dir": str(outputs), "state_dir": str(folder / "state"), **syncd}
    storage = {"enabled": True, "bucket": "results", "use_rust_client": rust}
    config.write_text(yaml.safe_dump({"object_storage": storage, "syncd": settings}))
    return outputs / "exec_1_aaaaaaaa", config


def reach(bucket: str, folder: Path, script: str) -> list[str]:
    """The command that runs bash `script` where `bucket`'s accelerate endpoint is this
    stand-in (both clients trust its CA: SSL_CERT_FILE for obstore, AWS_CA_BUNDLE for s3fs)."""
    certificates(host(bucket), folder)
    enter = ENTER.format(python=shlex.quote(sys.executable))
    return [
        "unshare", "--net", "--mount", "--propagation", "private",
        "sh", "-c", enter, "accelerate", str(folder), host(bucket), script,
    ]  # fmt: skip


class Refuse(http.server.BaseHTTPRequestHandler):
    def refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(400)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(ANSWER)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = refuse

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(folder: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 443), Refuse)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
