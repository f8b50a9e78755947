"""TLS on the listener (BCP 195 non-downgrading: TLS >= 1.2), mutual auth, and the client context for sending.

Real DCMTK echoscu/storescu with ``+tls``/``+tla`` and ``+cf``, certificates from the openssl CLI.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from service.core.models import Instance
from service.core.settings import Settings
from service.core.tls import client_context, server_context
from service.listener_main import Listener
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest import Pki, count, ingest_settings, instances, make_pki, running_listener, scu
from tests.support.net import free_port, wait_for_port
from tests.support.rows import add_job

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_settings(tmp_path: Path, pki: Pki, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listener_tls_port": free_port(),
        "tls_certificate": pki.server_cert,
        "tls_private_key": pki.server_key,
        "tls_ca_certificates": pki.ca_cert,
    }
    values.update(overrides)
    return ingest_settings(tmp_path, **values)


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki) -> Iterator[Listener]:
    with running_listener(_tls_settings(tmp_path, pki)) as listener:
        yield listener


def _tls_port(listener: Listener) -> int:
    port = listener.settings.listener_tls_port
    assert port is not None
    return port


def test_echo_and_store_over_tls(tls_listener: Listener, pki: Pki, shared_dir: Path) -> None:
    port = _tls_port(tls_listener)
    anonymous = ["+tla", "+cf", str(pki.ca_cert)]
    echo = echoscu("127.0.0.1", port, called_aet="CXR_GATEWAY", extra_args=anonymous)
    assert echo.returncode == 0, echo.stderr
    sent = storescu("127.0.0.1", port, [shared_dir / CR], called_aet="CXR_GATEWAY", extra_args=anonymous)
    assert sent.returncode == 0, sent.stderr
    [inst] = instances(tls_listener)
    assert (
        dcmread(tls_listener.settings.spool_dir / inst.spool_path).PixelData
        == dcmread(shared_dir / CR).PixelData
    )


def test_plain_dicom_is_refused_on_the_tls_port(tls_listener: Listener) -> None:
    port = _tls_port(tls_listener)
    plain = echoscu("127.0.0.1", port, called_aet="CXR_GATEWAY", timeout=15)
    assert plain.returncode != 0
    # ...and the listener keeps serving TLS after it.
    ok = echoscu(
        "127.0.0.1",
        port,
        called_aet="CXR_GATEWAY",
        extra_args=["+tla", "+cf", str(tls_listener.settings.tls_ca_certificates)],
    )
    assert ok.returncode == 0, ok.stderr


def _handshake(port: int, ca: Path, version: ssl.TLSVersion) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    # Let this client offer old protocols at all (OpenSSL's default security level forbids them).
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = version
    ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        assert tls.version() is not None


@contextlib.contextmanager
def _permissive_tls_server(pki: Pki) -> Iterator[int]:
    """A bare TLS server that still speaks TLS 1.0/1.1: proves the client below can offer them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    listening = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listening.accept()
                with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listening.getsockname()[1]
    finally:
        listening.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"]
)
def test_tls_before_1_2_is_refused(tls_listener: Listener, pki: Pki, version: ssl.TLSVersion) -> None:
    with _permissive_tls_server(pki) as permissive:
        _handshake(permissive, pki.ca_cert, version)  # this client really offers the old version
    port = _tls_port(tls_listener)
    _handshake(port, pki.ca_cert, ssl.TLSVersion.TLSv1_2)  # and gets into our listener with TLS 1.2
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(port, pki.ca_cert, version)
    assert "VERSION" in str(refused.value).upper() or "NO_PROTOCOLS" in str(refused.value).upper()


def test_mutual_tls_requires_a_client_certificate_from_our_ca(
    tmp_path: Path, pki: Pki, shared_dir: Path
) -> None:
    settings = _tls_settings(tmp_path, pki, tls_require_client_cert=True)
    with running_listener(settings) as listener:
        port = _tls_port(listener)
        ca = ["+cf", str(pki.ca_cert)]
        anonymous = echoscu("127.0.0.1", port, called_aet="CXR_GATEWAY", extra_args=["+tla", *ca], timeout=15)
        assert anonymous.returncode != 0
        rogue = echoscu(
            "127.0.0.1",
            port,
            called_aet="CXR_GATEWAY",
            extra_args=["+tls", str(pki.rogue_key), str(pki.rogue_cert), *ca],
            timeout=15,
        )
        assert rogue.returncode != 0
        client = ["+tls", str(pki.client_key), str(pki.client_cert), *ca]
        echo = echoscu("127.0.0.1", port, called_aet="CXR_GATEWAY", extra_args=client)
        assert echo.returncode == 0, echo.stderr
        sent = storescu("127.0.0.1", port, [shared_dir / CR], called_aet="CXR_GATEWAY", extra_args=client)
        assert sent.returncode == 0, sent.stderr
        assert count(listener, Instance) == 1


def test_tls_only_listener_has_no_plain_port(tmp_path: Path, pki: Pki) -> None:
    settings = _tls_settings(tmp_path, pki, listener_plaintext=False)
    with running_listener(settings):
        plain = echoscu("127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY", timeout=10)
        assert plain.returncode != 0


def test_server_context_is_non_downgrading(tmp_path: Path, pki: Pki) -> None:
    ctx = server_context(_tls_settings(tmp_path, pki, tls_require_client_cert=True))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED


# ---------------------------------------------------------------------------------------------- sending


def test_client_context_stores_to_our_tls_listener_with_mutual_auth(
    tmp_path: Path, pki: Pki, shared_dir: Path
) -> None:
    listener_settings = _tls_settings(tmp_path / "listener", pki, tls_require_client_cert=True)
    # The sender's own settings: its client certificate and the CA that signed the listener's.
    sender = ingest_settings(
        tmp_path / "sender",
        tls_certificate=pki.client_cert,
        tls_private_key=pki.client_key,
        tls_ca_certificates=pki.ca_cert,
    )
    with running_listener(listener_settings) as listener:
        ae = scu("PYNETSCU")
        assoc = ae.associate(
            "127.0.0.1",
            _tls_port(listener),
            ae_title="CXR_GATEWAY",
            tls_args=(client_context(sender), "127.0.0.1"),
        )
        assert assoc.is_established
        try:
            status = assoc.send_c_store(dcmread(shared_dir / CR))
            assert status.Status == 0x0000
        finally:
            assoc.release()
        assert count(listener, Instance) == 1


def test_client_context_to_dcmtk_storescp_and_refuses_an_unknown_server(
    tmp_path: Path, pki: Pki, shared_dir: Path
) -> None:
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        [
            "storescp",
            "-aet",
            "PACS",
            "+tls",
            str(pki.server_key),
            str(pki.server_cert),
            "+cf",
            str(pki.ca_cert),
            "-rc",
            "-od",
            str(out),
            str(port),
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_for_port("127.0.0.1", port)
        good = ingest_settings(
            tmp_path / "good",
            tls_certificate=pki.client_cert,
            tls_private_key=pki.client_key,
            tls_ca_certificates=pki.ca_cert,
        )
        assoc = scu("CXR_GATEWAY").associate(
            "127.0.0.1", port, ae_title="PACS", tls_args=(client_context(good), "127.0.0.1")
        )
        assert assoc.is_established
        try:
            assert assoc.send_c_store(dcmread(shared_dir / CR)).Status == 0x0000
        finally:
            assoc.release()
        assert len(list(out.iterdir())) == 1

        # Trusting only another CA, the sender must not talk to this server.
        wrong = ingest_settings(
            tmp_path / "wrong", tls_ca_certificates=pki.rogue_cert.parent / "rogue-ca.crt"
        )
        refused = scu("CXR_GATEWAY").associate(
            "127.0.0.1", port, ae_title="PACS", tls_args=(client_context(wrong), "127.0.0.1")
        )
        assert not refused.is_established
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_worker_delivery_sends_over_tls_to_a_tls_destination(
    tmp_path: Path, pki: Pki, shared_dir: Path
) -> None:
    """The delivery path (worker.delivery.deliver) honours Destination.tls with mutual auth."""
    from service.core.db import make_session_factory, migrate
    from service.core.models import Delivery
    from service.core.settings import Destination
    from service.core.status import DeliveryStatus
    from worker.delivery import deliver

    listener_settings = _tls_settings(tmp_path / "listener", pki, tls_require_client_cert=True)
    with running_listener(listener_settings) as listener:
        sender = ingest_settings(
            tmp_path / "sender",
            tls_certificate=pki.client_cert,
            tls_private_key=pki.client_key,
            tls_ca_certificates=pki.ca_cert,
            destinations=[
                Destination(ae_title="CXR_GATEWAY", host="127.0.0.1", port=_tls_port(listener), tls=True)
            ],
        )
        migrate(sender)
        sessions = make_session_factory(sender)
        out = sender.output_dir / "job" / "x.dcm"
        out.parent.mkdir(parents=True)
        out.write_bytes((shared_dir / CR).read_bytes())
        with sessions.begin() as s:
            add_job(s, "1.2.3.4", id="j" * 32)
            d = Delivery(
                job_id="j" * 32,
                ae_title="CXR_GATEWAY",
                host="127.0.0.1",
                port=_tls_port(listener),
                sop_instance_uid="1.2",
                kind="sc",
                output_path="job/x.dcm",
            )
            s.add(d)
            s.flush()
            delivery_id = d.id
        deliver(delivery_id, sender, sessions)
        with sessions() as s:
            row = s.get(Delivery, delivery_id)
            assert row is not None and row.status == DeliveryStatus.DELIVERED, row and row.last_error
        assert count(listener, Instance) == 1
