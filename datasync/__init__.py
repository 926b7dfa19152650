"""datasync: verified, content-addressed dataset replication.

Nothing here does I/O at import time; `datasync.bootstrap` is the one composition root.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
