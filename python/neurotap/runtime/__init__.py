"""The runtime: model loading, tokenizing, generation and parallel sampling on the native core.
Knows nothing of the methods built on top (NAD, NEAT, NEX): it takes resolved configurations."""
