"""Serving trained streams without Lightning: classify, stream, export, visualize."""
