"""The objects the node writes: the SR (through highdicom's templates), the encapsulated PDF, their UIDs.

Also key slices and the validation gate with ``dciodvfy``; it uses :mod:`model` types and :mod:`pipeline`.
"""
