"""The HTTP API on the Unix socket: app, handlers, wire (peer credentials, bodies, errors to HTTP),
trust and admission.
"""
