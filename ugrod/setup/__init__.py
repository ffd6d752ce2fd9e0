"""Installing and wiring ugrod into the host: systemd unit, sd_notify, Prometheus config and rules.
"""
