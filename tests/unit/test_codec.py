"""Golden tests of asynctc.lowlevel.codec: real kernel messages (tests/fixtures/netlink, recorded by
record.py there) decode field by field, and encoders round-trip. No privileges needed."""

from __future__ import annotations

import errno
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from asynctc.lowlevel import codec as c
from asynctc.lowlevel.codec import (
    ChainMsg,
    FilterMsg,
    LinkMsg,
    NlDone,
    NlError,
    OtherMsg,
    QdiscMsg,
    decode_messages,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netlink"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
IFINDEX: int = MANIFEST["ifindex"]
PEER: int = MANIFEST["peer_ifindex"]
PROG_ID: int = MANIFEST["prog_id"]
PROG_TAG: str = MANIFEST["prog_tag"]
U32_KEY_HANDLE = 0x80000800  # the first u32 key of hash table 800:
U32_TABLE_HANDLE = 0x80000000
IFF_BROADCAST, IFF_LOOPBACK, IFF_MULTICAST = 0x2, 0x8, 0x1000  # linux/if.h


# The reference decoder: pyroute2's TcMsg (asynctc's own decoder is struct only).
def _decode_tc_with_pyroute2(chunk: bytes, mtype: int, seq: int, pid: int) -> QdiscMsg | FilterMsg | ChainMsg:
    """tc messages decoded through pyroute2's TcMsg: the reference the struct decoder is tested against."""
    m = c.TcMsg(chunk)
    m.decode()
    try:
        return _tc_fields(m, mtype, seq, pid)
    finally:
        c._release(m)


def _tc_fields(m: Any, mtype: int, seq: int, pid: int) -> QdiscMsg | FilterMsg | ChainMsg:
    ifindex: int = m["index"]
    parent: int = m["parent"]
    if mtype in (c.RTM_NEWQDISC, c.RTM_DELQDISC):
        return QdiscMsg(type=mtype, seq=seq, ifindex=ifindex, parent=parent, handle=m["handle"],
                        kind=m.get_attr("TCA_KIND"), portid=pid)
    chain: int = m.get_attr("TCA_CHAIN", 0)
    if mtype in (c.RTM_NEWCHAIN, c.RTM_DELCHAIN):
        return ChainMsg(type=mtype, seq=seq, ifindex=ifindex, parent=parent, chain=chain, portid=pid)
    info: int = m["info"]
    kind: str | None = m.get_attr("TCA_KIND")
    bpf: dict[str, Any] = {}
    if kind == "bpf":
        opts = m.get_attr("TCA_OPTIONS")
        if opts is not None:
            bpf = {
                "bpf_name": opts.get_attr("TCA_BPF_NAME"),
                "bpf_id": opts.get_attr("TCA_BPF_ID"),
                "bpf_tag": opts.get_attr("TCA_BPF_TAG"),
                "bpf_flags": opts.get_attr("TCA_BPF_FLAGS"),
                "gen_flags": opts.get_attr("TCA_BPF_FLAGS_GEN"),
            }
    return FilterMsg(type=mtype, seq=seq, ifindex=ifindex, parent=parent, priority=info >> 16,
                     protocol=socket.ntohs(info & 0xFFFF), handle=m["handle"], kind=kind, chain=chain,
                     portid=pid, **bpf)


def golden(name: str) -> list[c.Message]:
    return decode_messages((FIXTURES / f"{name}.bin").read_bytes())


def portid_of(name: str) -> int:
    return c.iter_headers((FIXTURES / f"{name}.bin").read_bytes()).__next__()[5]


def test_manifest_is_consistent() -> None:
    assert len(PROG_TAG) == 16
    assert int(PROG_TAG, 16) >= 0
    assert MANIFEST["prog_name"] == "x"
    assert IFINDEX != PEER


@pytest.mark.parametrize(
    ("name", "seq", "orig_type"),
    [
        ("ack_qdisc_add", 101, c.RTM_NEWQDISC),
        ("ack_filter_add", 103, c.RTM_NEWTFILTER),
        ("ack_filter_del", 115, c.RTM_DELTFILTER),
        ("ack_qdisc_del", 116, c.RTM_DELQDISC),
    ],
)
def test_acks(name: str, seq: int, orig_type: int) -> None:
    (ack,) = golden(name)
    assert ack == NlError(seq=seq, errno=0, extack_msg=None, orig_type=orig_type, portid=portid_of(name))
    assert ack.is_ack


@pytest.mark.parametrize(
    ("name", "seq", "err", "orig_type", "text"),
    [
        ("err_qdisc_exists", 102, errno.EEXIST, c.RTM_NEWQDISC, "Exclusivity flag on, cannot modify"),
        ("err_filter_exists", 105, errno.EEXIST, c.RTM_NEWTFILTER, "Filter already exists"),
        ("err_filter_missing", 106, errno.ENOENT, c.RTM_DELTFILTER,
         "Filter with specified priority/protocol not found"),
        ("err_nodev", 107, errno.ENODEV, c.RTM_NEWTFILTER, None),
        # skip_sw on a veth: the kernel answers EOPNOTSUPP (KERNEL.md said EINVAL; 6.18 says this).
        ("err_skip_sw", 108, errno.EOPNOTSUPP, c.RTM_NEWTFILTER, None),
    ],
)
def test_errors_with_extended_ack(name: str, seq: int, err: int, orig_type: int, text: str | None) -> None:
    (msg,) = golden(name)
    assert isinstance(msg, NlError)
    assert (msg.seq, msg.errno, msg.orig_type, msg.extack_msg) == (seq, err, orig_type, text)
    assert not msg.is_ack


def _bpf_filter(seq: int, pid: int, **kw: Any) -> FilterMsg:
    base: dict[str, Any] = dict(
        type=c.RTM_NEWTFILTER, seq=seq, ifindex=IFINDEX, parent=c.INGRESS_PARENT, priority=1,
        protocol=c.ETH_P_ALL, handle=1, kind="bpf", chain=0, bpf_name="golden", bpf_id=PROG_ID,
        bpf_tag=PROG_TAG, bpf_flags=c.TCA_BPF_FLAG_ACT_DIRECT, gen_flags=c.TCA_CLS_FLAGS_NOT_IN_HW,
        portid=pid,
    )
    base.update(kw)
    return FilterMsg(**base)


def test_filter_dump_every_field() -> None:
    msgs = golden("dump_filters_ingress")
    pid = portid_of("dump_filters_ingress")
    head = dict(bpf_name=None, bpf_id=None, bpf_tag=None, bpf_flags=None, gen_flags=None)
    u32 = dict(kind="u32", priority=7, **head)
    assert msgs == [
        _bpf_filter(111, pid, handle=0, **head),  # the cls_bpf instance of priority 1 itself
        _bpf_filter(111, pid),
        _bpf_filter(111, pid, handle=0, **u32),  # u32 instance, its hash table, its key (added by `tc`)
        _bpf_filter(111, pid, handle=U32_TABLE_HANDLE, **u32),
        _bpf_filter(111, pid, handle=U32_KEY_HANDLE, **u32),
        NlDone(seq=111, errno=0, extack_msg=None, flags=c.NLM_F_MULTI, portid=pid),
    ]
    bpf = msgs[1]
    assert isinstance(bpf, FilterMsg)
    assert bpf.direct_action
    assert not bpf.in_hw
    assert not bpf.skip_sw
    assert not bpf.skip_hw
    assert bpf.is_new


def test_filter_get_and_echo() -> None:
    pid = portid_of("get_filter")
    assert golden("get_filter") == [
        _bpf_filter(109, pid),
        NlError(seq=109, errno=0, extack_msg=None, orig_type=c.RTM_GETTFILTER, portid=pid),
    ]
    echo, ack = golden("echo_filter_add")
    # Added without direct action: the kernel leaves TCA_BPF_FLAGS out altogether.
    assert echo == _bpf_filter(104, pid, parent=c.EGRESS_PARENT, priority=3, handle=2,
                               bpf_name="golden-eg", bpf_flags=None)
    assert isinstance(echo, FilterMsg)
    assert not echo.direct_action
    assert ack == NlError(seq=104, errno=0, extack_msg=None, orig_type=c.RTM_NEWTFILTER, portid=pid)


def test_qdisc_link_and_chain_dumps() -> None:
    pid = portid_of("dump_qdiscs")
    assert golden("dump_qdiscs") == [
        QdiscMsg(type=c.RTM_NEWQDISC, seq=112, ifindex=IFINDEX, parent=c.CLSACT_PARENT,
                 handle=c.CLSACT_HANDLE, kind="clsact", portid=pid),
        NlDone(seq=112, flags=c.NLM_F_MULTI, portid=pid),
    ]
    down = IFF_BROADCAST | IFF_MULTICAST
    assert golden("dump_links") == [
        LinkMsg(type=c.RTM_NEWLINK, seq=113, ifindex=1, name="lo", flags=IFF_LOOPBACK, portid=pid),
        *sorted(
            [LinkMsg(type=c.RTM_NEWLINK, seq=113, ifindex=IFINDEX, name="veth0", flags=down, portid=pid),
             LinkMsg(type=c.RTM_NEWLINK, seq=113, ifindex=PEER, name="veth1", flags=down, portid=pid)],
            key=lambda m: m.ifindex,
        ),
        NlDone(seq=113, flags=c.NLM_F_MULTI, portid=pid),
    ]
    assert golden("get_link") == [
        LinkMsg(type=c.RTM_NEWLINK, seq=110, ifindex=IFINDEX, name="veth0", flags=down, portid=pid),
        NlError(seq=110, errno=0, orig_type=c.RTM_GETLINK, portid=pid),
    ]
    assert golden("dump_chains") == [
        ChainMsg(type=c.RTM_NEWCHAIN, seq=114, ifindex=IFINDEX, parent=c.CLSACT_HANDLE, chain=0, portid=pid),
        ChainMsg(type=c.RTM_NEWCHAIN, seq=114, ifindex=IFINDEX, parent=c.CLSACT_HANDLE, chain=5, portid=pid),
        NlDone(seq=114, flags=c.NLM_F_MULTI, portid=pid),
    ]


def test_multicast_events_in_order() -> None:
    msgs = golden("events")
    pid = portid_of("ack_filter_add")
    kinds = [(type(m).__name__, m.type) for m in msgs]
    assert kinds == [
        ("LinkMsg", c.RTM_NEWLINK), ("LinkMsg", c.RTM_NEWLINK),
        ("QdiscMsg", c.RTM_NEWQDISC),
        ("ChainMsg", c.RTM_NEWCHAIN), ("FilterMsg", c.RTM_NEWTFILTER),
        ("ChainMsg", c.RTM_NEWCHAIN), ("FilterMsg", c.RTM_NEWTFILTER),
        ("FilterMsg", c.RTM_NEWTFILTER),  # u32, from the tc command
        ("ChainMsg", c.RTM_NEWCHAIN),  # tc chain add ... chain 5
        ("FilterMsg", c.RTM_DELTFILTER),
        ("ChainMsg", c.RTM_DELCHAIN), ("ChainMsg", c.RTM_DELCHAIN),
        ("QdiscMsg", c.RTM_DELQDISC),
        ("ChainMsg", c.RTM_DELCHAIN),
        ("LinkMsg", c.RTM_DELLINK), ("LinkMsg", c.RTM_DELLINK),
    ]
    # Events caused by our requests carry our seq and portid; the kernel's own carry 0.
    assert msgs[4] == _bpf_filter(103, pid)
    assert msgs[6] == _bpf_filter(104, pid, parent=c.EGRESS_PARENT, priority=3, handle=2,
                                  bpf_name="golden-eg", bpf_flags=None)
    u32 = msgs[7]
    assert isinstance(u32, FilterMsg)
    assert (u32.kind, u32.priority, u32.handle) == ("u32", 7, U32_KEY_HANDLE)
    assert u32.portid not in (0, pid)  # the tc process
    # The delete notification of a cls_bpf filter still carries its options.
    assert msgs[9] == _bpf_filter(115, pid, type=c.RTM_DELTFILTER, parent=c.EGRESS_PARENT, priority=3,
                                  handle=2, bpf_name="golden-eg", bpf_flags=None)
    assert msgs[8] == ChainMsg(type=c.RTM_NEWCHAIN, seq=0, ifindex=IFINDEX, parent=c.CLSACT_HANDLE, chain=5)
    assert msgs[2] == QdiscMsg(type=c.RTM_NEWQDISC, seq=101, ifindex=IFINDEX, parent=c.CLSACT_PARENT,
                               handle=c.CLSACT_HANDLE, kind="clsact", portid=pid)
    assert isinstance(msgs[12], QdiscMsg)
    assert not msgs[12].is_new
    link = msgs[-2]
    assert isinstance(link, LinkMsg)
    assert not link.is_new
    assert (link.ifindex, link.name) == (IFINDEX, "veth0")
    assert {m.ifindex for m in msgs[-2:] if isinstance(m, LinkMsg)} == {IFINDEX, PEER}


def test_stock_pyroute2_lacks_what_the_subclass_adds() -> None:
    """The reason TcMsg/BpfOptions exist: stock decoding leaves the tag, id and GEN flags UNKNOWN."""
    data = (FIXTURES / "get_filter.bin").read_bytes()
    stock = tcmsg(data)
    stock.decode()
    opts = stock.get_attr("TCA_OPTIONS")
    names = [a[0] for a in opts["attrs"]]
    assert "TCA_BPF_ID" not in names
    assert "UNKNOWN" in names
    ours = c.TcMsg(data)
    ours.decode()
    assert ours.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_ID") == PROG_ID
    assert ours.get_attr("TCA_CHAIN") == 0
    # The compiled attribute map is per class, not inherited from the parent's cache.
    assert c.BpfOptions._nlmsg_base__t_nla_map[11]["name"] == "TCA_BPF_ID"


def test_encode_filter_round_trip() -> None:
    data = c.encode_filter(
        42, c.RTM_NEWTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_REPLACE, 7,
        c.EGRESS_PARENT, 0x1234, 0x55, protocol=0x0800, prog_fd=9, name="prog", direct_action=True,
        gen_flags=c.TCA_CLS_FLAGS_SKIP_HW, chain=3,
    )
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert (length, mtype, seq, pid) == (len(data), c.RTM_NEWTFILTER, 42, 0)
    assert flags == c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_REPLACE
    family, ifindex, handle, parent, info = struct.unpack_from("=B3xiIII", data, 16)
    assert (family, ifindex, handle, parent) == (0, 7, 0x55, c.EGRESS_PARENT)
    assert info == (0x1234 << 16) | socket.htons(0x0800)
    (msg,) = decode_messages(data)
    assert msg == FilterMsg(type=c.RTM_NEWTFILTER, seq=42, ifindex=7, parent=c.EGRESS_PARENT,
                            priority=0x1234, protocol=0x0800, handle=0x55, kind="bpf", chain=3,
                            bpf_name="prog", bpf_flags=1, gen_flags=c.TCA_CLS_FLAGS_SKIP_HW)
    raw = c.TcMsg(data)
    raw.decode()
    assert raw.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_FD") == 9
    # Encoding is repeatable: every encoder builds a fresh pyroute2 message.
    again = c.encode_filter(
        42, c.RTM_NEWTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_REPLACE, 7,
        c.EGRESS_PARENT, 0x1234, 0x55, protocol=0x0800, prog_fd=9, name="prog", direct_action=True,
        gen_flags=c.TCA_CLS_FLAGS_SKIP_HW, chain=3,
    )
    assert again == data


def test_encode_filter_delete_and_get() -> None:
    (msg,) = decode_messages(c.encode_filter(5, c.RTM_DELTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK, 3,
                                             c.INGRESS_PARENT, 2, 1))
    assert msg == FilterMsg(type=c.RTM_DELTFILTER, seq=5, ifindex=3, parent=c.INGRESS_PARENT, priority=2,
                            protocol=c.ETH_P_ALL, handle=1, kind="bpf")
    data = c.encode_filter_get(6, 3, c.EGRESS_PARENT, 4, 2)
    assert struct.unpack_from("=HH", data, 4) == (c.RTM_GETTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK)
    with pytest.raises(ValueError, match="prog_fd"):
        c.encode_filter(1, c.RTM_NEWTFILTER, c.NLM_F_REQUEST, 3, c.INGRESS_PARENT, 1, 1)
    with pytest.raises(ValueError, match="priority"):
        c.encode_filter(1, c.RTM_DELTFILTER, c.NLM_F_REQUEST, 3, c.INGRESS_PARENT, 70000, 1)


def test_encode_qdisc_messages() -> None:
    add = c.encode_qdisc_add_clsact(11, 4)
    assert struct.unpack_from("=IHHI", add) == (
        len(add), c.RTM_NEWQDISC, c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_EXCL, 11)
    assert decode_messages(add) == [QdiscMsg(type=c.RTM_NEWQDISC, seq=11, ifindex=4, parent=c.CLSACT_PARENT,
                                             handle=c.CLSACT_HANDLE, kind="clsact")]
    assert decode_messages(c.encode_qdisc_del(12, 4)) == [
        QdiscMsg(type=c.RTM_DELQDISC, seq=12, ifindex=4, parent=c.CLSACT_PARENT, handle=c.CLSACT_HANDLE,
                 kind="clsact")]
    assert decode_messages(c.encode_qdisc_del(13, 4, kind=None)) == [
        QdiscMsg(type=c.RTM_DELQDISC, seq=13, ifindex=4, parent=c.CLSACT_PARENT, handle=c.CLSACT_HANDLE,
                 kind=None)]


def test_encode_dump_requests() -> None:
    for mtype in (c.RTM_GETQDISC, c.RTM_GETTFILTER, c.RTM_GETCHAIN):
        data = c.encode_dump_request(9, mtype, 4, c.INGRESS_PARENT)
        assert struct.unpack_from("=IHHI", data) == (len(data), mtype, c.NLM_F_REQUEST | c.NLM_F_DUMP, 9)
        assert struct.unpack_from("=iI", data, 20)[0] == 4
        assert struct.unpack_from("=I", data, 28)[0] == c.INGRESS_PARENT
    link = c.encode_dump_request(9, c.RTM_GETLINK)
    assert struct.unpack_from("=IHHI", link) == (len(link), c.RTM_GETLINK, c.NLM_F_REQUEST | c.NLM_F_DUMP, 9)
    # IFLA_EXT_MASK (29) = RTEXT_FILTER_SKIP_STATS right after struct ifinfomsg
    assert struct.unpack_from("=HHI", link, 32) == (8, 29, c.RTEXT_FILTER_SKIP_STATS)
    with pytest.raises(ValueError, match="dump type"):
        c.encode_dump_request(1, c.RTM_NEWTFILTER)
    get = c.encode_link_get(3, name="veth0")
    assert decode_messages(get) == [OtherMsg(type=c.RTM_GETLINK, seq=3,
                                             flags=c.NLM_F_REQUEST | c.NLM_F_ACK, data=get)]
    with pytest.raises(ValueError, match="ifindex or a name"):
        c.encode_link_get(3)


def test_set_seq_and_iter_headers() -> None:
    data = c.encode_qdisc_add_clsact(1, 4)
    moved = c.set_seq(data, 0xABCDEF)
    assert moved[:8] == data[:8]
    assert moved[12:] == data[12:]
    assert struct.unpack_from("=I", moved, 8) == (0xABCDEF,)
    two = (FIXTURES / "get_filter.bin").read_bytes()
    heads = list(c.iter_headers(two))
    assert [h[2] for h in heads] == [c.RTM_NEWTFILTER, c.NLMSG_ERROR]
    assert heads[0][0] == 0
    assert heads[1][0] == heads[0][1]
    # A truncated buffer yields only the complete messages.
    assert [h[2] for h in c.iter_headers(two[:-4])] == [c.RTM_NEWTFILTER]
    assert decode_messages(b"") == []
    assert decode_messages(two[:10]) == []


def test_done_with_error_and_extack() -> None:
    """NLMSG_DONE can carry a dump's error and extended-ACK TLVs (built here; rare to provoke)."""
    text = b"dump failed\0"
    tlv = struct.pack("=HH", 4 + len(text), c.NLMSGERR_ATTR_MSG) + text
    body = struct.pack("=i", -errno.EINVAL) + tlv
    msg = struct.pack("=IHHII", 16 + len(body), c.NLMSG_DONE, c.NLM_F_MULTI | c.NLM_F_ACK_TLVS, 77, 5) + body
    assert decode_messages(msg) == [NlDone(seq=77, errno=errno.EINVAL, extack_msg="dump failed",
                                           flags=c.NLM_F_MULTI | c.NLM_F_ACK_TLVS, portid=5)]


def test_uncapped_error_finds_extack_after_the_echoed_request() -> None:
    """Without NETLINK_CAP_ACK the kernel echoes the whole request before the TLVs."""
    req = c.encode_qdisc_add_clsact(8, 4)
    text = b"nope\0"
    tlv = struct.pack("=HH", 4 + len(text), c.NLMSGERR_ATTR_MSG) + text + b"\0" * 3
    body = struct.pack("=i", -errno.EBUSY) + req + tlv
    msg = struct.pack("=IHHII", 16 + len(body), c.NLMSG_ERROR, c.NLM_F_ACK_TLVS, 8, 0) + body
    assert decode_messages(msg) == [NlError(seq=8, errno=errno.EBUSY, extack_msg="nope",
                                            orig_type=c.RTM_NEWQDISC)]


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.bin")))
def test_fast_tc_decoding_equals_pyroute2(name: str) -> None:
    """tc messages are decoded with struct on hot paths; pyroute2's TcMsg is the reference: they must agree
    on every field of every recorded kernel message."""
    data = (FIXTURES / f"{name}.bin").read_bytes()
    for off, length, mtype, _flags, seq, pid in c.iter_headers(data):
        if mtype not in (c.RTM_NEWQDISC, c.RTM_DELQDISC, c.RTM_NEWTFILTER, c.RTM_DELTFILTER,
                         c.RTM_NEWCHAIN, c.RTM_DELCHAIN):
            continue
        (fast,) = decode_messages(data[off : off + length])
        assert fast == _decode_tc_with_pyroute2(data[off : off + length], mtype, seq, pid)
