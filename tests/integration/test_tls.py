"""DICOM over TLS: with [tls] set, TLS clients are served and plain TCP ones are not."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import Config
from node.service import Node

pytestmark = pytest.mark.integration


def make_cert(folder: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing")
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    if ca is None:
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True)
    else:
        csr = folder / f"{name}.csr"
        subprocess.run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(csr), "-subj", f"/CN={name}"], check=True, capture_output=True)
        subprocess.run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey",
                        str(ca[0]), "-CAcreateserial", "-out", str(crt), "-days", "2"],
                       check=True, capture_output=True)
    return key, crt


def test_tls_required_client_certificate(make_config: Callable[..., Config],
                                         start_node: Callable[..., Node], tmp_path: Path) -> None:
    ca_key, ca_crt = make_cert(tmp_path, "ca")
    node_key, node_crt = make_cert(tmp_path, "node", (ca_key, ca_crt))
    client_key, client_crt = make_cert(tmp_path, "client", (ca_key, ca_crt))
    _, stranger_crt = make_cert(tmp_path, "stranger")
    node = start_node(make_config(tls={
        "certificate": str(node_crt), "private_key": str(node_key),
        "ca_certificates": str(ca_crt), "require_client_certificate": True}))

    def echo(cert: tuple[Path, Path] | None, tls: bool = True) -> bool:
        ae = AE(ae_title="TLSCLIENT")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_crt))
            context.check_hostname = False
            if cert is not None:
                context.load_cert_chain(str(cert[1]), str(cert[0]))
        try:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="MSVLM",
                                 tls_args=(context, None) if context else None)
        except (ssl.SSLError, OSError):
            return False
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().Status == 0
        assoc.release()
        return ok

    assert echo((client_key, client_crt))
    assert not echo(None)  # no client certificate
    assert not echo((tmp_path / "stranger.key", stranger_crt))  # not signed by our CA
    assert not echo(None, tls=False)  # plain TCP
    assert echo((client_key, client_crt))  # and the node still serves


def test_silent_client_does_not_block_tls_accepts(make_config: Callable[..., Config],
                                                  start_node: Callable[..., Node],
                                                  tmp_path: Path) -> None:
    import socket

    key, crt = make_cert(tmp_path, "node")
    node = start_node(make_config(tls={"certificate": str(crt), "private_key": str(key)}))
    with socket.create_connection(("127.0.0.1", node.port)):  # connects, never handshakes
        ae = AE(ae_title="TLSCLIENT")
        ae.add_requested_context(Verification)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
        context.check_hostname = False
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSVLM", tls_args=(context, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
