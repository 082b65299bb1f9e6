"""Hypothesis against the receiving side of the wire (migration's decoder, the FT standby's and
primary's connections): arbitrary headers, lengths, kinds and payloads, well hashed or not. Nothing
is raised but the protocol's own ProtocolError, and nothing is allocated beyond the limit of the
kind a header claims. (bench/fuzz_wire.py runs the same check on 100,000 random cases.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.ft import protocol as p
from pykvm.transfer import wire
from tests.wire_fuzzing import check, header

pytestmark = pytest.mark.nokvm

KINDS = st.one_of(st.sampled_from([int(kind) for kind in wire.Kind]), st.integers(0, 255))
LENGTHS = st.one_of(st.integers(0, 1 << 64 - 1), st.integers(0, 1 << 16),
                    st.sampled_from([limit + delta for limit in p.FRAME_LIMITS.values() for delta in (-1, 0, 1)
                                     if limit + delta >= 0]))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(magic=st.sampled_from([wire.MAGIC, b"PYKW", b"\0\0\0\0"]), version=st.sampled_from([wire.VERSION, 0, 2]),
       kind=KINDS, flags=st.integers(0, 255), seq=st.sampled_from([0, 1, 1 << 63]), length=LENGTHS,
       digest=st.integers(0, (1 << 64) - 1), rest=st.binary(max_size=512), chunk=st.integers(1, 4096))
def test_any_header_is_refused_or_bounded(magic, version, kind, flags, seq, length, digest, rest, chunk):
    data = header(kind, seq, length, magic=magic, version=version, flags=flags, digest=digest) + rest
    assert check(data, chunk) is None


@FUZZ
@given(kind=KINDS, seq=st.sampled_from([0, 0, 1]), flags=st.sampled_from([0, wire.LIVE_DATA, wire.DIGEST_LATER]),
       payload=st.one_of(st.binary(max_size=2048), st.sampled_from([b"{}", b"[]", b"null", b"[" * 5000, b'"x"\n{}',
                                                                     b'{"protocol": 2, "mode": 5}\n']),
                         st.builds(lambda head, body: head + body, st.binary(min_size=8, max_size=8),
                                   st.binary(max_size=64))),
       trailing=st.binary(max_size=64), chunk=st.integers(1, 4096))
def test_any_well_hashed_frame_is_parsed_or_refused(kind, seq, flags, payload, trailing, chunk):
    """A frame whose hash is right gets past the wire: each kind's parser must refuse what it
    cannot parse with a ProtocolError, not with whatever json or struct raise."""
    data = header(kind, seq, len(payload), payload, flags=flags) + payload + trailing
    assert check(data, chunk) is None


def test_page_data_left_to_a_later_digest_is_refused_where_no_digest_follows():
    """Migration's stream has no SyncEnd to carry a digest of page data: a page frame that
    leaves its data out of its own hash (DIGEST_LATER, FT's) is refused there, on its header."""
    pages = np.array([0, 1], dtype="<u4")
    data = b"".join(bytes(b) for b in wire.page_frame(0, 0, pages, [bytes(2 * 4096)], digest_later=True))
    decoder = wire.Decoder(lambda slot, numbers: [memoryview(bytearray(2 * 4096))], allow_live_data=True)
    decoder.want()[0][:] = data[: wire.HEADER.size]
    with pytest.raises(wire.ProtocolError, match="flags 0x2 not allowed"):
        decoder.filled(wire.HEADER.size)


@pytest.mark.parametrize("kind", [wire.Kind.MACHINE_STATE, wire.Kind.HELLO, wire.Kind.DISK_CHANGES, wire.Kind.ACK])
def test_a_header_claiming_2_gib_is_refused_before_any_allocation(kind):
    data = header(kind, 0, 2 << 30, digest=0)
    for receiver in (wire.Decoder(lambda slot, pages: []), p.FtConnection(p.Role.STANDBY)):
        receiver.want()[0][:] = data
        with pytest.raises(wire.ProtocolError, match="exceeds its limit"):
            receiver.filled(len(data))
