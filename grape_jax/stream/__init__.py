"""Layer-streamed execution: calibration, gradient sensitivities, the fit and the merge with one decoder
layer's weights on the mesh at a time (DESIGN_NOTES.md, "Layer streaming")."""
