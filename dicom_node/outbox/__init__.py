"""What the node sends: report objects built and validated, their routing, their delivery with retries.

Objects come from :mod:`structured_reports`; delivery uses :mod:`dicom_node.net.scu`.
"""
