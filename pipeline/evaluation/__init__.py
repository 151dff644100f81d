"""Evaluation: scores files, accuracy, late fusion, plots and the report."""
