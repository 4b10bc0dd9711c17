"""The security suite (issue 12): every probe an attacker was seen to make, re-run against real nodes.

Attackers: a stranger on the network, a web page in the user's browser, an authenticated but hostile
member, and a holder of a leaked token (docs/ARCHITECTURE.md, "Threat model")."""
