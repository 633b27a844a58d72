"""CPU tactics: alternatives to the reference that the tuner can choose from on CPU."""
