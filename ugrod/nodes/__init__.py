"""Reaching nodes: transports, the per-node agent, code sync, and the programs that run on nodes
(remote/).
"""
