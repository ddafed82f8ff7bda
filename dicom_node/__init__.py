"""The network edge and composition root of the DICOM node: receives studies, runs the analysis, sends reports.

Subpackages, top to bottom: cli, ops, runs, outbox, net, ingest, db (docs/architecture.md).
"""
