"""The command line: ``dicom-node`` and one module per command group; the demo and its local PACS.

The top of the import graph: nothing in the node imports it.
"""
