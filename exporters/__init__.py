"""Programs that run on the nodes: the training-metrics helper and the GPU exporter.

Importing this package imports nothing else: a training script can do
``from exporters import ugro_metrics`` without prometheus-client installed.
"""
