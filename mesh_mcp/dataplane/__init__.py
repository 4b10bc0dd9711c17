"""The RPC data plane: llama.cpp RPC between nodes over authenticated TLS (relays, listener,
services) and the tensor service that feeds split workers without the model file."""
