"""Programs that run on nodes. Real, checked Python files; shipped to nodes as text and run with
the node's python3 (standard library only).
"""
