"""The data plane's protocol name and limits, in one place with the reason for each number.

The other modules read them as `limits.NAME` when they use them (not copied at import), so a test may lower
one (`monkeypatch.setattr(limits, "HANDSHAKE_TIMEOUT_S", 0.5)`) for the whole plane at once.
"""

from __future__ import annotations

ALPN = "mesh-llm-rpc/1"  # TLS ALPN: a peer that does not speak the RPC data plane is refused in the TLS handshake
HANDSHAKE_TIMEOUT_S = 5.0  # a TCP connect; TLS + mesh handshake + request from accept (loopback: 5.5 ms in all)
CLOSE_TIMEOUT_S = 5.0  # how long `close()` waits for tunnel threads to end before it logs and gives up
FRAME_LIMIT = 64 << 10  # control frames before the splice
CHUNK = 256 << 10  # bytes per recv while splicing
# Connections still authenticating (admission.py), each a thread and a socket: a host opens about 12 while
# llama-server loads, one at a time, so these counts are far above any member's need and bound a flood to
# ~64 threads. A refused connection is reset at once.
PER_SOURCE = 8  # from one stranger's address
SHARED = 32  # from strangers together
RESERVED = 32  # further slots for known members' addresses only
SWEEP_S = 0.25  # how often connections past HANDSHAKE_TIMEOUT_S are looked for and closed
IO_TIMEOUT_S = 30.0  # silence that ends a service's stream (a stalled transfer)
