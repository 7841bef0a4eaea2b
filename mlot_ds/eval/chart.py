"""A horizontal bar chart written as a PNG with the standard library only (zlib + struct).

The reproduction report needs one picture and the project has no plotting dependency, so this draws
bars, error whiskers and labels in a 5x7 pixel font (upper-case letters, digits, a few symbols;
lower case is drawn upper case) onto an RGB canvas and encodes it as a PNG.

    write_bar_chart("chart.png", [Panel("ROUGE-LSUM (HIGHER IS BETTER)", [Bar("SFT", 12.3, 0.4), ...])])
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# Each glyph: 7 rows of 5 pixels, most significant bit on the left.
_FONT = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    " ": (0, 0, 0, 0, 0, 0, 0), "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0),
    ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), "_": (0, 0, 0, 0, 0, 0, 31),
    "/": (1, 1, 2, 4, 8, 16, 16), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    ":": (0, 12, 12, 0, 12, 12, 0), "=": (0, 0, 31, 0, 31, 0, 0), "%": (24, 25, 2, 4, 8, 19, 3),
    "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8), "?": (14, 17, 1, 2, 4, 0, 4),
}
_SCALE = 2
_GLYPH_WIDTH = 6 * _SCALE  # 5 pixels and a space
_LINE = 11 * _SCALE
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
PALETTE = ((66, 114, 196), (237, 125, 49), (112, 173, 71), (165, 105, 189), (91, 155, 213), (255, 192, 0))


@dataclass
class Bar:
    label: str
    value: float
    spread: float = 0.0
    """Half length of the whisker (e.g. one standard deviation); 0 draws none."""
    group: int = 0
    """Colour index (e.g. 0 = baseline, 1 = MultiLevelOT)."""


@dataclass
class Panel:
    title: str
    bars: list[Bar] = field(default_factory=list)
    decimals: int = 2
    """Digits after the point of each row's printed value."""


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start:start + (x1 - x0) * 3] = bytes(colour) * (x1 - x0)

    def text(self, x: int, y: int, text: str, colour=BLACK) -> None:
        for index, char in enumerate(text.upper()):
            rows = _FONT.get(char, _FONT["?"])
            left = x + index * _GLYPH_WIDTH
            for row, bits in enumerate(rows):
                for column in range(5):
                    if bits >> (4 - column) & 1:
                        px, py = left + column * _SCALE, y + row * _SCALE
                        self.rect(px, py, px + _SCALE, py + _SCALE, colour)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def text_width(text: str) -> int:
    return len(text) * _GLYPH_WIDTH


def write_bar_chart(path: str | Path, panels: list[Panel], *, bar_width: int = 360) -> Path:
    """Draw ``panels`` one under the other (a title, then one labelled bar per row) and save a PNG.

    Each panel has its own scale, from ``min(0, smallest value - spread)`` to ``max(0, largest value +
    spread)``; bars grow from the zero line (to the left for negative values, e.g. a difference to a
    baseline) and each row prints its value to ``panel.decimals`` digits.
    """
    labels = [bar.label for panel in panels for bar in panel.bars]
    if not labels:
        raise ValueError("write_bar_chart: no bars to draw")
    margin = 12
    label_width = max(text_width(label) for label in labels) + margin
    value_width = max(text_width(f"-0000.{'0' * panel.decimals}") for panel in panels) + margin
    width = margin + label_width + bar_width + value_width + margin
    height = margin + sum(_LINE * (len(panel.bars) + 2) for panel in panels) + margin
    canvas = _Canvas(width, height)
    y = margin
    for panel in panels:
        canvas.text(margin, y, panel.title)
        y += _LINE + _SCALE * 3
        low_end = min([bar.value - bar.spread for bar in panel.bars] + [0.0])
        high_end = max([bar.value + bar.spread for bar in panel.bars] + [0.0])
        scale = bar_width / max(high_end - low_end, 1e-12)
        zero = margin + label_width + int(round(-low_end * scale))

        def x_of(value: float) -> int:
            return zero + int(round(value * scale))

        for bar in panel.bars:
            canvas.text(margin, y + _SCALE * 2, bar.label)
            left, right = sorted((zero, x_of(bar.value)))
            canvas.rect(left, y + _SCALE, right, y + _LINE - _SCALE, PALETTE[bar.group % len(PALETTE)])
            if bar.spread > 0:
                low, high = x_of(bar.value - bar.spread), x_of(bar.value + bar.spread)
                middle = y + _LINE // 2
                canvas.rect(low, middle - 1, high, middle + 1, BLACK)
                canvas.rect(low, middle - 4, low + 2, middle + 4, BLACK)
                canvas.rect(high - 2, middle - 4, high, middle + 4, BLACK)
            canvas.text(margin + label_width + bar_width + margin, y + _SCALE * 2, f"{bar.value:.{panel.decimals}f}")
            y += _LINE
        canvas.rect(zero, y - _LINE * len(panel.bars), zero + 1, y, GREY)
        y += _LINE
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path
