"""Client a sealed workload imports to talk to its embassy."""
