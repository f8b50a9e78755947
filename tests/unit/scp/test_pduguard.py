"""The PDU guard's bookkeeping over bytes (no sockets): limits, contexts, command and data set sizes."""

from __future__ import annotations

import struct

import pytest

from service.core.status import ReasonCode
from service.scp.pduguard import GuardLimits, PduInspector, ReceiveBudget, Violation
from tests.support import pdu as P

MiB = 1024 * 1024


def _accept(inspector: PduInspector, *context_ids: int) -> None:
    """Show the inspector an A-ASSOCIATE-AC accepting ``context_ids`` (and rejecting context 9)."""
    items = P.item(0x10, P.APPLICATION_CONTEXT.encode())
    for cid in context_ids:
        items += P.item(0x21, bytes([cid, 0, 0, 0]) + P.item(0x40, P.EXPLICIT_LE.encode()))
    items += P.item(0x21, bytes([9, 0, 3, 0]) + P.item(0x40, P.EXPLICIT_LE.encode()))
    ac = P.pdu(P.A_ASSOCIATE_AC, struct.pack(">HH", 1, 0) + bytes(64) + items)
    inspector.sent(ac[:10])  # in two sends, as a socket may take it
    inspector.sent(ac[10:])


def _inspector(**overrides: object) -> PduInspector:
    values: dict[str, object] = {
        "max_pdu": MiB,
        "max_instance_bytes": 10_000,
        "budget": ReceiveBudget(4 * MiB),
        "budget_wait": 0.05,
    }
    values.update(overrides)
    return PduInspector(GuardLimits(**values))  # type: ignore[arg-type]


def _violation(inspector: PduInspector, data: bytes, *, step: int = 0) -> ReasonCode:
    with pytest.raises(Violation) as caught:
        for start in range(0, len(data), step or len(data)):
            inspector.feed(data[start : start + (step or len(data))])
    return caught.value.reason


def test_a_valid_exchange_passes_byte_by_byte_and_returns_its_budget() -> None:
    inspector = _inspector()
    for byte in P.associate_rq():
        inspector.feed(bytes([byte]))
    _accept(inspector, 1, 3)
    exchange = P.c_echo_rq(3) + P.c_store_rq("1.2.3") + P.p_data(P.pdv(1, 0x02, bytes(5000))) + P.release_rq()
    for start in range(0, len(exchange), 7):
        inspector.feed(exchange[start : start + 7])
    assert inspector.limits.budget.used == 0


def test_a_pdu_over_the_maximum_is_refused_at_its_header() -> None:
    inspector = _inspector()
    _accept(inspector, 1)
    assert _violation(inspector, struct.pack(">BBL", P.P_DATA_TF, 0, MiB + 1)) == ReasonCode.PDU_TOO_LARGE
    assert inspector.limits.budget.used == 0


def test_p_data_before_the_association_is_refused() -> None:
    assert _violation(_inspector(), P.c_echo_rq()) == ReasonCode.PROTOCOL_VIOLATION


def test_a_rejected_or_unknown_context_is_refused() -> None:
    for context in (9, 5):
        inspector = _inspector()
        _accept(inspector, 1)
        assert _violation(inspector, P.c_echo_rq(context)) == ReasonCode.PROTOCOL_VIOLATION


def test_a_command_set_over_64_kib_is_refused() -> None:
    inspector = _inspector()
    _accept(inspector, 1)
    fragment = P.p_data(P.pdv(1, 0x01, bytes(30_000)))
    assert _violation(inspector, fragment * 3) == ReasonCode.PROTOCOL_VIOLATION


def test_a_c_store_data_set_over_the_instance_limit_is_refused() -> None:
    inspector = _inspector()
    _accept(inspector, 1)
    data = (
        P.c_store_rq("1.2.3") + P.p_data(P.pdv(1, 0x00, bytes(6000))) + P.p_data(P.pdv(1, 0x02, bytes(6000)))
    )
    assert _violation(inspector, data, step=1000) == ReasonCode.INSTANCE_TOO_LARGE


def test_another_message_may_not_bring_a_large_data_set() -> None:
    inspector = _inspector()
    _accept(inspector, 3)
    echo = P.p_data(P.pdv(3, 0x03, P.command_set(0x0030, P.VERIFICATION, data_set=True)))
    data = echo + P.p_data(P.pdv(3, 0x00, bytes(600_000))) + P.p_data(P.pdv(3, 0x02, bytes(600_000)))
    assert _violation(inspector, data, step=65536) == ReasonCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">LBB", 1, 1, 3),  # shorter than its own header
        struct.pack(">LBB", 100, 1, 3) + b"xx",  # overruns the PDU
        struct.pack(">LBB", 4, 1, 0x02) + b"xx",  # a data set before any command
    ],
)
def test_malformed_pdv_items_are_refused(body: bytes) -> None:
    inspector = _inspector()
    _accept(inspector, 1)
    assert _violation(inspector, P.pdu(P.P_DATA_TF, body)) == ReasonCode.PROTOCOL_VIOLATION


def test_a_pdu_waits_for_the_budget_then_is_refused() -> None:
    budget = ReceiveBudget(MiB)
    first, second = _inspector(budget=budget), _inspector(budget=budget)
    for inspector in (first, second):
        _accept(inspector, 1)
    first.feed(struct.pack(">BBL", P.P_DATA_TF, 0, MiB))  # the whole budget, body still to come
    assert _violation(second, struct.pack(">BBL", P.P_DATA_TF, 0, 100)) == ReasonCode.RECEIVE_MEMORY_BUSY
    first.release()  # the connection closed
    assert budget.used == 0


def test_unknown_pdu_types_and_tiny_peer_maximums_are_refused() -> None:
    assert _violation(_inspector(), P.pdu(0x09, b"x")) == ReasonCode.PROTOCOL_VIOLATION
    assert _violation(_inspector(), P.associate_rq(max_pdu=1)) == ReasonCode.PROTOCOL_VIOLATION
