"""Training a tiny model of the architecture: a synthetic shapes data set and its image checker."""
