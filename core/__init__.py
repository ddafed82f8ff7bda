"""What every layer of the product shares: the one error hierarchy (:mod:`core.errors`).

It sits below ``pipeline``, ``model``, ``structured_reports`` and ``dicom_node`` and imports none of them.
"""
