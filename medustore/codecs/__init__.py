"""medustore's codecs: numcodecs codecs (the algorithms) and their zarr v3 adapters.

The Codec contract (numcodecs): ``encode(array) -> bytes``, ``decode(bytes, out=None) ->
array``, ``get_config() -> dict`` of JSON public attributes with ``id``, and
``from_config(config)``. Every chunk is self-describing and versioned (see each module).
"""

import numcodecs

from medustore.codecs.lattice import LatticeCodec
from medustore.codecs.lattices import LATTICES, Lattice, get_lattice
from medustore.codecs.threshold import DiffThresholdCodec, threshold_info

__all__ = [
    "LATTICES",
    "DiffThresholdCodec",
    "Lattice",
    "LatticeCodec",
    "get_lattice",
    "threshold_info",
]

# Entry points register these for processes that never import medustore; registering here
# too covers a source checkout that was not installed.
numcodecs.register_codec(LatticeCodec)
numcodecs.register_codec(DiffThresholdCodec)

# The zarr v3 adapters register themselves with zarr's codec registry on import: a checkout
# that was never pip-installed (no entry points) still opens archives.
from medustore.codecs import zarr3  # noqa: E402, F401
