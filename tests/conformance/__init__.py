"""One backend contract suite, run against every backend (see ``conftest.py``)."""
