"""Method layer: calibration (routing statistics, expert-output similarity, gradient sensitivities)."""
