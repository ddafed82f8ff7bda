"""The DICOM network edge: the Storage SCP and its association rules, outgoing associations, TLS.

It knows the database only through :mod:`dicom_node.ingest.recorder` (what a received instance becomes).
"""
