"""Durable record: the event log (segments, fsync, recovery), snapshots, the ledger (the one
writer), and job artefacts on the head.
"""
