"""Codec conformance checks that mirror numcodecs' own (``numcodecs.tests.common``).

numcodecs 0.17 no longer ships its test helpers, so the two that medustore's tests use
are restated here: a codec's config survives JSON and the registry, and an array survives
``encode``/``decode`` with and without ``out`` and from any buffer-protocol input.
"""

from __future__ import annotations

import json

import numcodecs
import numpy as np
from numcodecs.abc import Codec


def check_config(codec: Codec) -> None:
    """The config round-trips through JSON, and the registry rebuilds an equal codec."""
    config = json.loads(json.dumps(codec.get_config()))
    assert codec == numcodecs.get_codec(config)


def assert_array_items_equal(res: object, arr: np.ndarray) -> None:
    """Same dtype, same number of items, same values (NaN matches NaN), any shape."""
    assert isinstance(res, np.ndarray)
    res, arr = res.reshape(-1, order="A"), arr.reshape(-1, order="A")
    assert res.shape == arr.shape and res.dtype == arr.dtype
    same = (res == arr) | (np.isnan(res) & np.isnan(arr))
    assert same.all(), f"{int((~same).sum())} item(s) differ"


def check_encode_decode_array(arr: np.ndarray, codec: Codec) -> None:
    """``decode(encode(arr))`` gives ``arr`` back: returned, into ``out``, and from the
    encoding viewed as a numpy array."""
    enc = codec.encode(arr)
    assert_array_items_equal(codec.decode(enc), arr)
    out = np.empty_like(arr)
    codec.decode(enc, out=out)
    assert_array_items_equal(out, arr)
    assert_array_items_equal(codec.decode(np.frombuffer(bytes(enc), dtype=np.uint8)), arr)
