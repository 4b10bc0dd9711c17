"""The agents' blackboard: scrubbing (presidio), storage and search (SQLite FTS5), and the feed
gossiped across the mesh. Arrives with the blackboard issue; nothing here yet.
"""
