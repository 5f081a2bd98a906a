"""The Neurons service: the public query API over a trained network.

``model`` holds the math (activations of named units, the gradient of one
unit's activation with respect to the input, the optimal stimulus by projected
gradient ascent, top inputs); ``sources`` says where parameters come from
(live shards refreshed on an interval, a checkpoint directory, an .npz file,
a seeded random initialisation); ``server`` is the gRPC service.
"""
