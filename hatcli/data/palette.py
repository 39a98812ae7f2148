"""Class colours for drawing label maps: Pascal VOC's colour map, which any class count can use."""

from __future__ import annotations


def voc_colormap(count: int) -> list[tuple[int, int, int]]:
    """The first `count` colours of the Pascal VOC devkit's colour map (class 0 black, 1 dark red,
    2 dark green, ...): the bits of a class index spread over the high bits of R, G and B, so
    neighbouring indices get clearly different colours."""
    colours = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours
