"""The methods: NAD (best-of-N by neuron agreement), RAD (by routing agreement, MoE), NEAT (early exit), and the one selection
registry every evaluation picks from. Importing this package registers every method."""
from . import selection  # noqa: F401  (the registry first: the methods below register into it)
from . import nad, neat, rad  # noqa: F401
