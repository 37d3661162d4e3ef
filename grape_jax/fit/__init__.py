"""Method layer: the fit merge operator (merged down projections refitted by ridge least squares)."""
