"""Code shared by the inference service and the training jobs.

Imports neither `service` nor `training`. Knows nothing of HTTP or of training loops.
"""
