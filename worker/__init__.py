"""Celery workers: inference on chest radiographs and delivery of the results."""

__version__ = "0.1.0"
