"""LAN discovery over mDNS/DNS-SD (`zeroconf`): a public mesh's listing announced on the local network, and a
browse that collects every listing announced there — so a room of laptops with no relay reachable still finds its
meshes (issue 15, item 4).

This module moves listing BYTES only: what a listing says, and whether it is valid, is `listing.py`'s business.
A listing rides in the TXT record of one service instance of type `_mesh-llm._udp.local.` per announcing node
(instance `<mesh id>-<node id>`, SRV = the node's QUIC port, A/AAAA = its addresses), cut into chunks of
`CHUNK_BYTES` under the keys `l0`, `l1`, …, with `n` = the chunk count and `v` = `TXT_VERSION`
(`encode_txt` / `decode_txt`, pure). Whether to announce at all is the caller's rule: a private mesh is never
announced; `LanAnnouncer` only announces a listing it is given.

Everything here is bounded: the TXT a node sends or reads (`MAX_TXT_BYTES`), the services one browse keeps
(`MAX_SERVICES`), and every network wait (`REGISTER_TIMEOUT_S`, `GOODBYE_TIMEOUT_S`, the browse window). A
malformed TXT from a stranger is logged at debug level and skipped, never raised to the caller.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Any

import anyio
from zeroconf import (
    BadTypeInNameException,
    DNSText,
    InterfaceChoice,
    ServiceInfo,
    ServiceStateChange,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh_mcp.discovery.listing import MAX_LISTING_BYTES
from mesh_mcp.errors import MeshLLMError, ProtocolError

log = logging.getLogger("mesh_llm.discovery")

SERVICE_TYPE = "_mesh-llm._udp.local."
TXT_VERSION = b"1"
# A TXT string is one length byte and at most 255 bytes (RFC 6763 §6.1); `l32=` plus 250 bytes is 254.
CHUNK_BYTES = 250
# zeroconf sends and accepts mDNS packets of at most 8966 bytes (RFC 6762 §17: 9000 with the IP/UDP headers); the
# TXT record shares its packet with the DNS header and the instance name (≤ ~100 bytes). A listing of
# MAX_LISTING_BYTES (8192) encodes to 8356 bytes. Such a packet is IP-fragmented on Ethernet and Wi-Fi (6 fragments
# at MTU 1500): wired LANs, home routers and Linux/macOS stacks pass it; some access points that convert multicast to
# unicast or drop fragments do not, so listings should stay small (a typical one is well under 1300 bytes, one
# unfragmented packet — RFC 6763 §6.2's advice).
MAX_TXT_BYTES = 8800
# One browse keeps at most this many services: a LAN flooded with fake announcements costs a bounded amount.
MAX_SERVICES = 256
REGISTER_TIMEOUT_S = 10.0  # probing (~0.75 s) + announcing, with room for a loaded machine
UPDATE_TIMEOUT_S = 10.0  # the re-announcements of a changed TXT
GOODBYE_TIMEOUT_S = 5.0  # the goodbye packets on stop, then closing the sockets

_CHUNK_KEY = re.compile(rb"l(0|[1-9][0-9]{0,3})")
_DNS_TYPE_TXT = 16  # RFC 1035
_DNS_CLASS_IN = 1


def encode_txt(listing: bytes) -> bytes:
    """The TXT record's wire bytes (length-prefixed strings) that carry `listing`.

    Raises ProtocolError when there is no listing or it is larger than MAX_LISTING_BYTES: receivers would drop it."""
    if not listing:
        raise ProtocolError("An empty listing cannot be announced on the LAN: pass the mesh's listing.")
    if len(listing) > MAX_LISTING_BYTES:
        raise ProtocolError(
            f"The listing is {len(listing)} bytes, more than the {MAX_LISTING_BYTES} a LAN announcement carries; "
            "list fewer models or shorten the mesh name."
        )
    chunks = [listing[i : i + CHUNK_BYTES] for i in range(0, len(listing), CHUNK_BYTES)]
    strings = [b"v=" + TXT_VERSION, b"n=%d" % len(chunks)] + [b"l%d=" % i + c for i, c in enumerate(chunks)]
    raw = b"".join(bytes((len(s),)) + s for s in strings)
    if len(raw) > MAX_TXT_BYTES:  # only if MAX_LISTING_BYTES grew past what one mDNS packet carries
        raise ProtocolError(f"The listing's TXT record is {len(raw)} bytes, more than the {MAX_TXT_BYTES} allowed.")
    return raw


def decode_txt(raw: bytes, max_bytes: int = MAX_LISTING_BYTES) -> bytes:
    """The listing carried by a TXT record's wire bytes; ProtocolError when they are malformed.

    Strict on what this format defines (version, count, every chunk present once, full chunks but the last, the
    total within `max_bytes`); keys it does not define are ignored, for a later version's additions."""
    if len(raw) > MAX_TXT_BYTES:
        raise ProtocolError(f"TXT record of {len(raw)} bytes is larger than the {MAX_TXT_BYTES} allowed.")
    fields: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(raw):
        length = raw[pos]
        end = pos + 1 + length
        if end > len(raw):
            raise ProtocolError("TXT record is truncated: a string runs past its end.")
        key, sep, value = raw[pos + 1 : end].partition(b"=")
        pos = end
        if key not in (b"v", b"n") and not _CHUNK_KEY.fullmatch(key):
            continue  # not ours (or a later version's): ignored
        if not sep:
            raise ProtocolError(f"TXT key {key!r} has no value.")
        if key in fields:
            raise ProtocolError(f"TXT key {key!r} appears twice.")
        fields[key] = value
    if fields.get(b"v") != TXT_VERSION:
        raise ProtocolError(f"TXT version {fields.get(b'v')!r} is not {TXT_VERSION!r}, the one this node reads.")
    count_text = fields.get(b"n", b"")
    max_chunks = -(-max_bytes // CHUNK_BYTES)
    if not count_text.isdigit() or len(count_text) > 4 or not 1 <= int(count_text) <= max_chunks:
        raise ProtocolError(f"TXT chunk count {count_text!r} is not a number from 1 to {max_chunks}.")
    count = int(count_text)
    if len(fields) != count + 2:
        raise ProtocolError(f"TXT record has {len(fields) - 2} listing chunks, but says n={count}.")
    chunks = []
    for i in range(count):
        chunk = fields.get(b"l%d" % i)
        if chunk is None:
            raise ProtocolError(f"TXT record lacks chunk l{i} of {count}.")
        if (len(chunk) != CHUNK_BYTES and i != count - 1) or not 1 <= len(chunk) <= CHUNK_BYTES:
            raise ProtocolError(f"TXT chunk l{i} is {len(chunk)} bytes: all but the last are {CHUNK_BYTES}.")
        chunks.append(chunk)
    listing = b"".join(chunks)
    if len(listing) > max_bytes:
        raise ProtocolError(f"Listing of {len(listing)} bytes is larger than the {max_bytes} allowed.")
    return listing


def instance_name(mesh_id: str, node_id: str) -> str:
    """The service instance this node announces for this mesh: `<mesh id>-<node id>`, one DNS label (≤ 63)."""
    label = f"{_label_part(mesh_id, 'mesh id')}-{_label_part(node_id, 'node id')}"
    return f"{label}.{SERVICE_TYPE}"


def _label_part(text: str, what: str) -> str:
    part = re.sub(r"[^0-9A-Za-z]", "", text)[:24]
    if not part:
        raise ValueError(f"A {what} of letters or digits is needed to name the LAN announcement, not {text!r}.")
    return part


def _ips(addresses: Sequence[str]) -> list[str]:
    """The IP literals among `addresses` ("ip", "ip:port" or "[ipv6]:port"); hostnames and 0.0.0.0/:: are left out
    (an A/AAAA record holds an address a peer can reach)."""
    out: list[str] = []
    for entry in addresses:
        candidates = [entry]
        host, sep, port = entry.rpartition(":")
        if sep and port.isdigit():
            candidates.append(host.strip("[]"))
        for candidate in candidates:
            try:
                ip = ipaddress.ip_address(candidate)
            except ValueError:
                continue
            if not ip.is_unspecified and str(ip) not in out:
                out.append(str(ip))
            break
        else:
            log.debug("LAN announcement: %r is not an IP address; left out of the A/AAAA records", entry)
    return out


def _zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    """A started AsyncZeroconf on `interfaces` (the IP addresses of local interfaces; None = every IPv4 interface)."""
    try:
        return AsyncZeroconf(interfaces=list(interfaces) if interfaces is not None else InterfaceChoice.All)
    except OSError as exc:
        raise MeshLLMError(
            f"Could not open the mDNS socket for LAN discovery ({exc}); check that a network interface with "
            "multicast is up, or leave LAN discovery off."
        ) from exc


async def _close(azc: AsyncZeroconf) -> None:
    """Close `azc` and its sockets, bounded and shielded so a cancelled caller still releases them."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(GOODBYE_TIMEOUT_S) as scope:
        await azc.async_close()
    if scope.cancelled_caught:
        log.warning("Closing the mDNS sockets took longer than %.0f s; they are released at exit.", GOODBYE_TIMEOUT_S)


class LanAnnouncer:
    """Announces one listing on the LAN until stopped; `stop()` sends the goodbye that withdraws it at once.

    Usable as `async with LanAnnouncer() as lan: await lan.start(...)` (stopped on exit)."""

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        self._interfaces = interfaces
        self._azc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None

    @property
    def name(self) -> str | None:
        """The instance name announced (zeroconf may add a suffix on a name clash); None when not announcing."""
        return self._info.name if self._info is not None else None

    async def start(self, listing: bytes, port: int, addresses: Sequence[str], *, mesh_id: str, node_id: str) -> None:
        """Announce `listing` for mesh `mesh_id` from node `node_id`, whose QUIC endpoint is `addresses` (IPs, or
        "ip:port": only the IPs are used) and `port`. Returns once the name is probed and announced.

        Raises ProtocolError for an empty or oversized listing, MeshLLMError when the mDNS socket cannot be opened or
        the announcement did not complete within REGISTER_TIMEOUT_S."""
        if self._azc is not None:
            raise RuntimeError("This LanAnnouncer is already announcing; call update() or stop() first.")
        raw = encode_txt(listing)
        name = instance_name(mesh_id, node_id)
        info = ServiceInfo(
            SERVICE_TYPE,
            name,
            port=port,
            properties=raw,
            server=f"mesh-llm-{_label_part(node_id, 'node id')}.local.",
            parsed_addresses=_ips(addresses),
        )
        azc = _zeroconf(self._interfaces)
        try:
            with anyio.fail_after(REGISTER_TIMEOUT_S):
                await (await azc.async_register_service(info, allow_name_change=True))
        except BaseException as exc:
            await _close(azc)
            if isinstance(exc, TimeoutError):
                raise MeshLLMError(
                    f"The LAN announcement of {name} did not complete within {REGISTER_TIMEOUT_S:.0f} s; "
                    "the machine may be overloaded or multicast blocked on this network."
                ) from exc
            raise
        self._azc, self._info = azc, info
        log.info("Announcing this mesh on the LAN as %s (port %d)", info.name, port)

    async def update(self, listing: bytes) -> None:
        """Announce a changed listing in place of the current one (browsers see the new TXT)."""
        if self._azc is None or self._info is None:
            raise RuntimeError("update() before start(): this LanAnnouncer announces nothing yet.")
        raw = encode_txt(listing)
        old = self._info
        if raw == old.text:
            return
        info = ServiceInfo(
            old.type, old.name, port=old.port, properties=raw, server=old.server, addresses=old.addresses
        )
        with anyio.move_on_after(UPDATE_TIMEOUT_S) as scope:
            await (await self._azc.async_update_service(info))
        self._info = info
        if scope.cancelled_caught:
            log.warning(
                "The LAN announcement's update took longer than %.0f s; peers may see it late.", UPDATE_TIMEOUT_S
            )

    async def stop(self) -> None:
        """Withdraw the announcement (a goodbye packet) and close the sockets; idempotent, bounded, survives a
        cancelled caller."""
        azc, info = self._azc, self._info
        self._azc = self._info = None
        if azc is None or info is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(GOODBYE_TIMEOUT_S):
            await (await azc.async_unregister_service(info))
        await _close(azc)
        log.info("Withdrew the LAN announcement %s", info.name)

    async def __aenter__(self) -> LanAnnouncer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def browse(
    within_s: float = 3.0, interfaces: Sequence[str] | None = None, *, max_services: int = MAX_SERVICES
) -> list[bytes]:
    """Every listing announced on the LAN and seen within `within_s` seconds (reassembled, not yet validated),
    from at most `max_services` services; malformed announcements are skipped with a debug log.

    Takes `within_s` (mDNS answers arrive over a second or two: the queries back off 1 s, 2 s, …). Returns [] with
    a warning when no mDNS socket can be opened (LAN discovery is then off, other discovery goes on)."""
    try:
        azc = _zeroconf(interfaces)
    except MeshLLMError as exc:
        log.warning("%s", exc)
        return []
    send, receive = anyio.create_memory_object_stream[tuple[str, ServiceStateChange]](max_services * 4)
    seen: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        try:
            send.send_nowait((name, state_change))
        except anyio.WouldBlock:
            pass  # a flood: what is already queued is plenty

    browser: AsyncServiceBrowser | None = None
    try:
        browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        with anyio.move_on_after(within_s):
            async with anyio.create_task_group() as tg:
                async for name, change in receive:
                    if change is ServiceStateChange.Removed:
                        seen.discard(name)
                    elif name not in seen and len(seen) < max_services:
                        seen.add(name)
                        tg.start_soon(_ask, azc, name, within_s)
                    elif name not in seen:
                        log.debug("LAN browse: more than %d services announced; %s ignored", max_services, name)
        now = current_time_millis()
        listings = [listing for name in sorted(seen) if (listing := _cached_listing(azc, name, now)) is not None]
    finally:
        with anyio.CancelScope(shield=True):
            if browser is not None:
                await browser.async_cancel()
            send.close()
            receive.close()
            await _close(azc)
    return listings


async def _ask(azc: AsyncZeroconf, name: str, within_s: float) -> None:
    """Query `name`'s records, in case its TXT did not come with the browse answers; bounded by the browse."""
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
    except BadTypeInNameException:
        return
    await info.async_request(azc.zeroconf, timeout=within_s * 1000)


def _cached_listing(azc: AsyncZeroconf, name: str, now: float) -> bytes | None:
    record = azc.zeroconf.cache.get_by_details(name, _DNS_TYPE_TXT, _DNS_CLASS_IN)
    if not isinstance(record, DNSText) or record.is_expired(now):
        log.debug("LAN browse: no TXT record from %s in time; skipped", name)
        return None
    try:
        return decode_txt(record.text)
    except ProtocolError as exc:
        log.debug("LAN browse: dropped the announcement %s: %s", name, exc)
        return None
