"""The RPC data plane: llama.cpp RPC carried between nodes over authenticated, encrypted TCP, and the
tensor service that feeds split workers without the model file.

llama.cpp RPC has no authentication and no encryption, so ggml-rpc-server and llama-server only
ever talk to 127.0.0.1. A pipeline split puts a relay at each end:

    host:   llama-server ──TCP──► Relay (127.0.0.1:P) ══ TLS 1.3 over TCP ══► DataPlaneServer ──TCP──► ggml-rpc-server
                                   one per remote target         the worker's mesh interface     127.0.0.1:targets[name]

Each tunnel is one TCP connection (TCP_NODELAY everywhere: RPC is small-message ping-pong):

1. TLS 1.3 and the mesh handshake, both sides proving the mesh secret and their node key (`tls.py`).
2. The host names a target, or a service (`services.py`): rpc-server forwarding, the tensor service
   (`tensor_fetch.py`); unknown names are refused.
3. Splice both ways until either side closes or fails, counting the bytes (`splice.py`).

`listener.py` accepts, admits unauthenticated connections per source, runs each on its thread and closes
everything (`DataPlaneServer`, the worker's end); `relay.py` is the host's end (`Relay`); `limits.py` holds
the protocol name and every limit.
"""
