"""Membership and transport: node identity, invite tokens, node records and gossip (pure), owner-signed key
rotation, the QUIC transport and its admission limits, the tunnel that carries API requests to the node serving a
model, RTT, and the runtime that drives them (plus the blackboard's streams over it).
"""
