"""Shoal: the package shared by the controller, the node agent and the miniworker.

This package is also mounted read-only into every function container (the runner imports
:mod:`shoal.protocol` from it), so this file and ``protocol.py`` must import only the standard library.
"""

__version__ = "0.1.0"
