"""The miniworker: one process that owns exactly one Docker container and feeds it calls.

``miniworker.runner`` runs inside the container and must import only the standard library and
``shoal.protocol``; this ``__init__`` must therefore stay empty of imports.
"""
