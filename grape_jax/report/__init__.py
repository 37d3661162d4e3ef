"""App layer: recipes and model cards, method comparisons, plots."""
