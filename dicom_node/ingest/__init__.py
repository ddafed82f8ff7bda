"""What a received instance becomes: its checked identity, its spool file and its rows; series completeness.

No network here: :mod:`dicom_node.net` calls in.
"""
