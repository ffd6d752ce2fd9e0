"""Prometheus exposition: the collector, metric families computed from state at scrape time,
runtime stats.
"""
