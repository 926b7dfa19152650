"""Storage backends behind one narrow protocol (see ``base``)."""
