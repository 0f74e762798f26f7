"""Wire formats: each defined once, versioned, and pinned by tests/vectors."""
