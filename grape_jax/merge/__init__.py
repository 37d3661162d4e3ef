"""Method layer: the pure merge of a model state by a plan, and neuron alignment."""
