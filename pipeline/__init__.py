"""Pure stages of a run: series selection, DICOM to NIfTI, preprocessing and QC, clinical notes; a synthetic writer.

Nothing here knows the network or the database; errors come from :mod:`core.errors`.
"""
