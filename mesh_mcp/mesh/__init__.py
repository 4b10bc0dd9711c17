"""The mesh: invite tokens, node records and gossip (pure), and the QUIC transport that carries
them between nodes, plus the tunnel that carries API requests to the node serving a model.
"""
