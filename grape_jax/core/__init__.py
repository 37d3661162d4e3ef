"""Core layer: the configuration, the parameter table, sharding, the pure transformer maths and the NNX module."""
