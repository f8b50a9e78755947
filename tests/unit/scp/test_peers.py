from __future__ import annotations

from service.core.settings import Source
from service.scp.peers import PeerPolicy, normalise_address


def test_empty_list_admits_everyone() -> None:
    policy = PeerPolicy([])
    assert policy.open
    assert policy.allows("ANY", "203.0.113.9")


def test_title_and_address_must_both_match() -> None:
    policy = PeerPolicy(
        [Source(ae_title="PACS", host="10.1.2.3"), Source(ae_title="CR1", host="10.1.5.0/24")]
    )
    assert policy.allows("PACS", "10.1.2.3")
    assert policy.allows("PACS  ", "10.1.2.3")  # AE titles are space padded on the wire
    assert not policy.allows("PACS", "10.1.2.4")
    assert not policy.allows("CR1", "10.1.2.3")
    assert policy.allows("CR1", "10.1.5.77")
    assert not policy.allows("OTHER", "10.1.5.77")
    assert policy.ae_titles == ["CR1", "PACS"]


def test_ipv4_mapped_ipv6_and_garbage_addresses() -> None:
    policy = PeerPolicy([Source(ae_title="PACS", host="10.1.2.3")])
    assert policy.allows("PACS", "::ffff:10.1.2.3")
    assert not policy.allows("PACS", "not-an-ip")
    assert normalise_address("fe80::1%eth0") is not None


def test_host_names_resolve_and_unknown_names_admit_nobody() -> None:
    policy = PeerPolicy(
        [Source(ae_title="LOCAL", host="localhost"), Source(ae_title="GHOST", host="no-such-host.invalid")]
    )
    assert policy.allows("LOCAL", "127.0.0.1")
    assert not policy.allows("GHOST", "127.0.0.1")
