"""The statement log: a hash-chained, PCR-anchored record of everything the embassy signed."""
