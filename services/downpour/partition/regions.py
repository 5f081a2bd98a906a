"""Rectangular regions of a layer's location grid, and the arithmetic on them.

A region is half-open (y0, y1, x0, x1) in a layer's global coordinates. The
plan cuts every layer into tiles with ``bounds``, finds what a tile reads
from the layer below with ``window`` (filters, pools) and ``grow`` (LCN), and
the runtime copies parts of arrays with ``crop``.
"""

from __future__ import annotations

Region = tuple[int, int, int, int]  # y0, y1, x0, x1, half-open


def bounds(n: int, parts: int) -> list[int]:
    """Cut points of n into ``parts`` nearly equal pieces."""
    return [(i * n) // parts for i in range(parts + 1)]


def window(r: Region, field: int, stride: int) -> Region:
    """The input region read by the valid (field, stride) windows of output region r."""
    y0, y1, x0, x1 = r
    return (y0 * stride, (y1 - 1) * stride + field, x0 * stride, (x1 - 1) * stride + field)


def grow(r: Region, by: int, h: int, w: int) -> Region:
    """r grown by ``by`` on every side, clipped to an h x w map."""
    y0, y1, x0, x1 = r
    return (max(0, y0 - by), min(h, y1 + by), max(0, x0 - by), min(w, x1 + by))


def intersect(a: Region, b: Region) -> Region | None:
    """The overlap of a and b, or None when they do not overlap."""
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def contains(outer: Region, inner: Region) -> bool:
    """Whether ``inner`` lies wholly inside ``outer``."""
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def size(r: Region) -> tuple[int, int]:
    """(height, width) of r."""
    return (r[1] - r[0], r[3] - r[2])


def crop(arr, at: Region, sub: Region):
    """The part of ``arr`` (covering region ``at``, spatial axes first) over ``sub``: a view."""
    return arr[sub[0] - at[0] : sub[1] - at[0], sub[2] - at[2] : sub[3] - at[2]]
