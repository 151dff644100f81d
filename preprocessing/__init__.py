"""Offline stages (split lists, synthetic data, feature extraction), each also an `eleatt` subcommand."""
