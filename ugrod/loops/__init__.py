"""The daemon's long-running loops: launching and watching jobs, node monitoring, the watchdog,
stack dumps.
"""
