"""Public meshes: how a mesh is listed and found (issue 15).

A mesh that publishes itself is described by a `listing.Listing` (the one wire format, moved as bytes by every
transport); `score` ranks the listings a node found for `--auto` (pure); `nostr` publishes and fetches listings on
public Nostr relays, `mdns` announces and browses them on the local network. This plane imports the error tree, the
clock and the mesh's tokens, never serving or the API.
"""
