"""The Brain-Adapter: M3D-CLIP's frozen towers, the trainable adapter and projections; loading, inference, training.

Evaluation, calibration and the synthetic cohort live here too; it uses :mod:`pipeline` and nothing of the node.
"""
