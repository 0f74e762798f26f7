"""Metering: activation files, instructions, scoring, registry."""
