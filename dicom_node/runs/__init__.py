"""Runs: claims and locks, the executors (threads, worker processes, Celery) and the processing of one run.

:mod:`dicom_node.runs.processing` is the run's story: inputs, pipeline, model, outbox.
"""
