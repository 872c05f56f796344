"""Astra: interactive video world models on Wan-2.1."""
