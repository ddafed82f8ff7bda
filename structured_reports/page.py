"""Layout of the PDF page: text blocks placed from the top, the warning banner, key slices drawn as squares.

Used by :mod:`structured_reports.pdf` (the page) and ``dicom-node check`` (the key-slice PNG).  Positions are in
inches on an A4 figure; text is wrapped at spaces only, measured in matplotlib's default font, so a UID or a run id
is never split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch
from matplotlib.patheffects import withStroke
from matplotlib.text import Text
from matplotlib.textpath import TextToPath

from structured_reports.types import KeySlice, ReportError

#: Black margin around a key slice, as a fraction of its longer edge: the orientation markers sit in it.
KEY_SLICE_MARGIN = 0.12

#: Font size and weight of the result, and of the warning banner: the warning is as prominent as the result.
RESULT_FONT: dict[str, Any] = {"fontsize": 12.0, "fontweight": "bold"}

#: The page (inches), its left, right and top margin, and the width text may take.
A4_INCHES = (8.27, 11.69)
MARGIN = 0.55
TEXT_WIDTH = A4_INCHES[0] - 2 * MARGIN

#: Colours: the template's outline on key slices, the warning's text and frame, the banner's fill.
OUTLINE_COLOUR = "#ffd700"
WARNING_COLOUR = "#b2182b"
WARNING_FILL = "#fde8e6"

_TEXT_TO_PATH = TextToPath()


def _width_pt(text: str, fontsize: float, fontweight: str) -> float:
    """Width of *text* in points, as matplotlib lays it out in the default font."""
    width, _, _ = _TEXT_TO_PATH.get_text_width_height_descent(
        text, FontProperties(size=fontsize, weight=fontweight), ismath=False)
    return float(width)


class Page:
    """Text blocks and axes placed from the top of an A4 figure downwards (positions in inches)."""

    def __init__(self, fig: Figure) -> None:
        self.fig = fig
        self.y = MARGIN

    @staticmethod
    def frac_y(inches: float) -> float:
        """The figure fraction of a height *inches* below the top of the page."""
        return 1.0 - inches / A4_INCHES[1]

    @staticmethod
    def lines(text: str, fontsize: float, fontweight: str = "normal", width: float = TEXT_WIDTH) -> list[str]:
        """*text* wrapped at spaces to *width* inches at this font (paragraphs kept; a word is never split).

        Only spaces break a line, so a run id, a UID or a hyphenated word stays whole for the reader and for
        ``pdftotext``.
        """
        limit = width * 72
        lines: list[str] = []
        for paragraph in text.split("\n"):
            line = ""
            for word in paragraph.split(" "):
                candidate = f"{line} {word}" if line else word
                if line and _width_pt(candidate, fontsize, fontweight) > limit:
                    lines.append(line)
                    line = word
                else:
                    line = candidate
            lines.append(line)
        return lines

    def text(self, text: str, *, fontsize: float = 9.0, fontweight: str = "normal", color: str = "black",
             after: float = 0.08, linespacing: float = 1.35) -> Text:
        """A wrapped text block at the left margin; the cursor moves below it."""
        lines = self.lines(text, fontsize, fontweight)
        artist = self.fig.text(MARGIN / A4_INCHES[0], self.frac_y(self.y), "\n".join(lines), fontsize=fontsize,
                               fontweight=fontweight, color=color, va="top", linespacing=linespacing)
        self.y += len(lines) * fontsize * linespacing / 72 + after
        return artist

    def heading(self, text: str) -> Text:
        """A section heading (bold, a little larger than the text)."""
        return self.text(text, fontsize=10.5, fontweight="bold", after=0.05)

    def banner(self, warnings: Sequence[str]) -> Text:
        """The warnings in a framed band across the page, in :data:`RESULT_FONT`."""
        pad = 0.12
        size, weight = float(RESULT_FONT["fontsize"]), str(RESULT_FONT["fontweight"])
        lines = [line for warning in warnings for line in self.lines(warning, size, weight, TEXT_WIDTH - 2 * pad)]
        height = len(lines) * size * 1.3 / 72 + 2 * pad
        self.fig.add_artist(FancyBboxPatch(
            (MARGIN / A4_INCHES[0], self.frac_y(self.y + height)), TEXT_WIDTH / A4_INCHES[0],
            height / A4_INCHES[1], boxstyle="square,pad=0", transform=self.fig.transFigure,
            facecolor=WARNING_FILL, edgecolor=WARNING_COLOUR, linewidth=2.0))
        artist = self.fig.text((MARGIN + pad) / A4_INCHES[0], self.frac_y(self.y + pad), "\n".join(lines),
                               color=WARNING_COLOUR, va="top", linespacing=1.3, **RESULT_FONT)
        self.y += height + 0.18
        return artist

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float], *,
              fontsize: float = 8.5, after: float = 0.12) -> None:
        """A table at the cursor: a bold header (``\n`` breaks it), a rule, one line per row; the cursor moves below.

        The first column is left-aligned, the others (numbers) right-aligned, so ``pdftotext -layout`` keeps each
        row on one line.

        Parameters
        ----------
        header : Sequence[str]
            Column titles.
        rows : Sequence[Sequence[str]]
            Cells, one sequence per row, as many as ``header``.
        widths : Sequence[float]
            Column widths in inches (at most :data:`TEXT_WIDTH` together).
        fontsize : float, optional
            Size of the cells and the header.
        after : float, optional
            Space below the table (inches).
        """
        if len(widths) != len(header) or any(len(row) != len(header) for row in rows):
            raise ReportError("a table needs as many widths and cells per row as header columns")
        lefts = [MARGIN + sum(widths[:index]) for index in range(len(widths))]
        line = fontsize * 1.45 / 72
        header_lines = max(title.count("\n") + 1 for title in header)
        for index, title in enumerate(header):
            x = lefts[index] if index == 0 else lefts[index] + widths[index]
            self.fig.text(x / A4_INCHES[0], self.frac_y(self.y), title, fontsize=fontsize, fontweight="bold",
                          va="top", ha="left" if index == 0 else "right", linespacing=1.2)
        self.y += header_lines * fontsize * 1.2 / 72 + 0.05
        self.fig.add_artist(Line2D([MARGIN / A4_INCHES[0], (MARGIN + sum(widths)) / A4_INCHES[0]],
                                   [self.frac_y(self.y)] * 2, transform=self.fig.transFigure, color="#555555",
                                   linewidth=0.6))
        self.y += 0.05
        for row in rows:
            for index, cell in enumerate(row):
                x = lefts[index] if index == 0 else lefts[index] + widths[index]
                self.fig.text(x / A4_INCHES[0], self.frac_y(self.y), cell, fontsize=fontsize, va="top",
                              ha="left" if index == 0 else "right")
            self.y += line
        self.y += after

    def axes(self, left: float, width: float, height: float) -> Axes:
        """Axes *height* inches tall at the cursor, *left* and *width* in inches; the cursor moves below."""
        axes = self.fig.add_axes((left / A4_INCHES[0], self.frac_y(self.y + height),
                                  width / A4_INCHES[0], height / A4_INCHES[1]))
        self.y += height
        return axes


def square_key_slice(key: KeySlice, side: int | None = None) -> KeySlice:
    """*key* centred on a square of *side* pixels (default: its longer edge), padded with its darkest value.

    Parameters
    ----------
    key : KeySlice
        The slice.
    side : int or None, optional
        Edge of the square, at least the slice's longer edge.

    Returns
    -------
    KeySlice
        The padded slice (outline padded with False), same title and orientation.

    Raises
    ------
    ReportError
        If the slice does not fit in the square.
    """
    image = np.asarray(key.image)
    rows, columns = image.shape
    side = max(rows, columns) if side is None else side
    if rows > side or columns > side:
        raise ReportError(f"key slice {image.shape} does not fit a square of {side} pixels")
    top, left = (side - rows) // 2, (side - columns) // 2
    padded = np.full((side, side), float(np.min(image)) if image.size else 0.0, dtype=np.float32)
    padded[top:top + rows, left:left + columns] = image
    outline = None
    if key.outline is not None:
        outline = np.zeros((side, side), dtype=bool)
        outline[top:top + rows, left:left + columns] = key.outline
    return KeySlice(image=padded, outline=outline, title=key.title, orientation=key.orientation)


#: Where each orientation marker goes, in axes fractions: (x, y, horizontal and vertical alignment).
_MARKER_PLACES = ((0.025, 0.5, "left", "center"), (0.975, 0.5, "right", "center"),
                  (0.5, 0.975, "center", "top"), (0.5, 0.025, "center", "bottom"))


def draw_key_slice(axes: Axes, key: KeySlice, side: int | None = None) -> None:
    """Draw one key slice as the PDF page shows it: a grey square, outline in yellow, markers, title.

    Parameters
    ----------
    axes : matplotlib.axes.Axes
        Empty axes to draw into (their frame and ticks are switched off).
    key : KeySlice
        The slice; its outline is drawn when it is neither empty nor everywhere, its
        orientation (patient directions at the viewer's left, right, top, bottom) as white letters.
    side : int or None, optional
        Pixels of the square the slice is centred on (one value for every slice of a page gives them
        one size and one scale); default the slice's longer edge plus :data:`KEY_SLICE_MARGIN`.
    """
    key = square_key_slice(key, square_side(max(np.shape(key.image))) if side is None else side)
    axes.imshow(key.image, cmap="gray", interpolation="nearest")
    if key.outline is not None and key.outline.any() and not key.outline.all():
        axes.contour(key.outline.astype(float), levels=[0.5], colors=[OUTLINE_COLOUR], linewidths=0.8)
    if key.orientation is not None:
        for letter, (x, y, ha, va) in zip(key.orientation, _MARKER_PLACES, strict=True):
            axes.text(x, y, letter, transform=axes.transAxes, ha=ha, va=va, color="white", fontsize=10,
                      fontweight="bold", path_effects=[withStroke(linewidth=2.0, foreground="black")])
    axes.set_axis_off()
    axes.set_title(key.title, fontsize=8)


def square_side(longest: int) -> int:
    """Edge of the square a slice whose longer edge is *longest* is drawn on (with the markers' margin)."""
    return math.ceil(longest * (1.0 + KEY_SLICE_MARGIN))
