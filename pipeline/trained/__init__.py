"""A trained stream: the record training writes into checkpoints, and the loader everything that serves a model uses."""
