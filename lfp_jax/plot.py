r"""Heatmaps of LRP relevance: normalisation, colour maps and PNG output (matplotlib, optional).

``pip install lfp-jax[plot]`` (or ``pip install matplotlib``) enables this module; ``import lfp_jax``
never imports matplotlib, and the functions here import it when they are called. Arrays go in and
come out as NumPy arrays (JAX arrays are accepted).

The conventions are those of LRP heatmaps (zennit, the LRP toolbox):

* **Channels summed.** An image's relevance ``R`` of shape ``(H, W, C)`` becomes one map
  ``R_ij = Σ_c R_ijc`` (see :func:`reduce_channels` for which axis is summed).
* **Symmetric normalisation around 0**, per map:

  .. math::  \hat R_{ij} = \operatorname{clip}(R_{ij} / s, -1, 1), \qquad
             s = \max_{kl} |R_{kl}| \;\; (\texttt{level=None}) \quad\text{or}\quad
             s = \operatorname{percentile}_{\texttt{level}}(|R|)

  so 0 stays 0, the sign is kept, and positive and negative relevance share one scale (a map of
  zeros stays zeros). A ``level`` below 100 saturates the largest ``|R|`` and brings out the rest.
* **Diverging colour maps** with relevance 0 at the centre: matplotlib's ``"bwr"`` (negative blue,
  0 white, positive red) and :data:`COLDNHOT` (``"coldnhot"``: negative blue to cyan, 0 black,
  positive red to yellow). ``\hat R`` in ``[-1, 1]`` is looked up at ``(\hat R + 1)/2`` in the
  colour map. Both maps are mirror-symmetric: the colour of ``-R`` is the colour of ``R`` with red
  and blue exchanged.

Example::

    import jax, lfp_jax
    from lfp_jax.plot import save_heatmap

    composite = lfp_jax.composites.epsilon_plus_flat()
    explain = jax.jit(lfp_jax.lrp(lambda p, x: model.apply({"params": p}, x), composite))
    logits, relevance = explain(params, images, target=labels)  # relevance shaped like images
    save_heatmap("heatmap.png", relevance[0], cmap="coldnhot", scale=8)

:func:`grid` draws several samples and presets in one labelled figure (``python -m experiments.explain``).
:func:`tokens` colours the tokens of a text by their relevance (HTML in notebooks, PNG or PDF).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["COLDNHOT", "TokenHeatmap", "grid", "heatmap", "normalize", "reduce_channels",
           "register_colormaps", "save_heatmap", "tokens"]

#: Name under which :func:`register_colormaps` registers the hot-cold map with matplotlib.
COLDNHOT = "coldnhot"

# The hot-cold map as (position, RGB) stops: cold colours below 0.5, black at 0.5 (relevance 0), hot
# colours above; the stops at 1 - t are those at t with red and blue exchanged (mirror symmetry).
_COLDNHOT_STOPS = (
    (0.00, (0.0, 1.0, 1.0)),   # cyan: most negative
    (0.25, (0.0, 0.0, 1.0)),   # blue
    (0.50, (0.0, 0.0, 0.0)),   # black: zero relevance
    (0.75, (1.0, 0.0, 0.0)),   # red
    (1.00, (1.0, 1.0, 0.0)),   # yellow: most positive
)

# Colours are looked up in a table of this many entries (odd: the middle entry is exactly the centre
# of the colour map, and entry k mirrors entry _LUT_SIZE - 1 - k).
_LUT_SIZE = 257


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("lfp_jax.plot needs matplotlib: pip install matplotlib (or pip install "
                          "lfp-jax[plot])") from e
    return matplotlib


def register_colormaps() -> None:
    """Register :data:`COLDNHOT` (``"coldnhot"``) with matplotlib, so that ``cmap="coldnhot"`` works in
    matplotlib as well as here. Idempotent; :func:`heatmap` and :func:`grid` call it."""
    matplotlib = _matplotlib()
    from matplotlib.colors import LinearSegmentedColormap

    if COLDNHOT in matplotlib.colormaps:
        return
    cmap = LinearSegmentedColormap.from_list(COLDNHOT, list(_COLDNHOT_STOPS), N=_LUT_SIZE)
    matplotlib.colormaps.register(cmap, name=COLDNHOT)


def _colormap(cmap: Any):
    """A matplotlib ``Colormap`` for a name or a ``Colormap``."""
    matplotlib = _matplotlib()
    register_colormaps()
    if isinstance(cmap, str):
        if cmap not in matplotlib.colormaps:
            raise ValueError(f"unknown colour map {cmap!r}: use 'bwr', {COLDNHOT!r} or any name in "
                             f"matplotlib.colormaps")
        return matplotlib.colormaps[cmap]
    return cmap


def reduce_channels(relevance: Any, channel_axis: int | str | None = "auto") -> np.ndarray:
    """Relevance maps ``(H, W)``, or ``(N, H, W)`` for a batch: ``relevance`` summed over its channel axis.

    ``channel_axis``:

    * ``"auto"`` (default): by the number of dimensions, assuming channels last (NHWC, as flax and
      JAX image models use):

      - 2-D ``(H, W)``: a map already, nothing summed;
      - 3-D with a last axis of at most 4 entries, ``(H, W, C)``: the last axis summed;
      - 3-D with a longer last axis, ``(N, H, W)``: a batch of maps, nothing summed;
      - 4-D ``(N, H, W, C)``: the last axis summed.

      Anything else needs an explicit ``channel_axis``.
    * an ``int``: that axis is summed (``1`` for NCHW, ``0`` for CHW); the result must be 2-D or 3-D.
    * ``None``: nothing summed; ``relevance`` must be ``(H, W)`` or ``(N, H, W)``.
    """
    r = np.asarray(relevance, dtype=np.float64)
    if channel_axis == "auto":
        if r.ndim == 2:
            channel_axis = None
        elif r.ndim == 3:
            channel_axis = -1 if r.shape[-1] <= 4 else None
        elif r.ndim == 4:
            channel_axis = -1
        else:
            raise ValueError(f"relevance of shape {r.shape}: expected (H, W), (H, W, C), (N, H, W) or "
                             f"(N, H, W, C); pass channel_axis for other layouts")
    elif isinstance(channel_axis, str):
        raise ValueError(f"channel_axis must be 'auto', an int or None, got {channel_axis!r}")
    if channel_axis is not None:
        r = r.sum(axis=channel_axis)
    if r.ndim not in (2, 3):
        raise ValueError(f"relevance maps must be (H, W) or (N, H, W) after summing channel_axis="
                         f"{channel_axis!r}, got shape {r.shape}")
    return r


def normalize(relevance: Any, level: float | None = None,
              channel_axis: int | str | None = "auto") -> np.ndarray:
    r"""Relevance maps scaled symmetrically into ``[-1, 1]``, each map (image) on its own.

    The channels are summed first (:func:`reduce_channels`), then each map ``R`` becomes

    .. math::  \hat R = \operatorname{clip}(R / s, -1, 1), \qquad
               s = \max |R| \text{ if level is None, else } s = \operatorname{percentile}(|R|, \text{level}),

    with ``\hat R = 0`` where ``s = 0`` (a map of zeros). Zero relevance stays exactly 0 and
    ``normalize(-R) = -normalize(R)``.

    Args:
      relevance: ``(H, W)``, ``(H, W, C)``, ``(N, H, W)`` or ``(N, H, W, C)`` (see :func:`reduce_channels`).
      level: percentile in ``(0, 100]`` of ``|R|`` taken as the scale (``100`` is the maximum): values
        of larger magnitude saturate at ±1. ``None``: the maximum.
      channel_axis: see :func:`reduce_channels`.

    Returns:
      float64 maps ``(H, W)`` or ``(N, H, W)`` with values in ``[-1, 1]``.
    """
    r = reduce_channels(relevance, channel_axis)
    batch = r if r.ndim == 3 else r[None]
    flat = np.abs(batch.reshape(batch.shape[0], -1))
    if level is None:
        scale = flat.max(axis=1)
    else:
        if not 0 < level <= 100:
            raise ValueError(f"level is a percentile in (0, 100], got {level!r}")
        scale = np.percentile(flat, level, axis=1)
    scale = scale.reshape(-1, 1, 1)
    out = np.clip(np.divide(batch, scale, out=np.zeros_like(batch), where=scale > 0), -1.0, 1.0)
    return out if r.ndim == 3 else out[0]


def heatmap(relevance: Any, cmap: Any = "bwr", level: float | None = None,
            channel_axis: int | str | None = "auto") -> np.ndarray:
    """Relevance as a uint8 RGB image ``(H, W, 3)`` (``(N, H, W, 3)`` for a batch).

    The maps of :func:`normalize` (``R̂`` in ``[-1, 1]``) coloured by ``cmap`` at ``(R̂ + 1) / 2``:
    relevance 0 gets the centre colour of the map (white for ``"bwr"``, black for ``"coldnhot"``), the
    largest positive relevance its top colour (red, yellow), the most negative its bottom colour
    (blue, cyan). Colours come from a 257-entry table of ``cmap``, indexed by
    ``rint((R̂ + 1) / 2 · 256)``, so the table's middle entry is exactly the centre and ``-R`` gets
    the mirrored entry.

    Args:
      relevance: see :func:`reduce_channels`.
      cmap: ``"bwr"``, ``"coldnhot"``, any matplotlib colour map name, or a ``Colormap``.
      level: see :func:`normalize`.
      channel_axis: see :func:`reduce_channels`.
    """
    n = normalize(relevance, level, channel_axis)
    lut = _colormap(cmap).resampled(_LUT_SIZE)(np.arange(_LUT_SIZE))[:, :3]
    lut = np.rint(lut * 255).astype(np.uint8)
    index = np.rint((n + 1.0) / 2.0 * (_LUT_SIZE - 1)).astype(np.intp)
    return lut[index]


def _upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return np.repeat(np.repeat(rgb, int(scale), axis=0), int(scale), axis=1)


def save_heatmap(path: str | os.PathLike, relevance: Any, cmap: Any = "bwr", level: float | None = None,
                 channel_axis: int | str | None = "auto", scale: int = 1) -> np.ndarray:
    """Write the :func:`heatmap` of one image's relevance as a PNG file; returns the RGB array written.

    Args:
      path: the PNG file.
      relevance: one image's relevance, ``(H, W)`` or ``(H, W, C)`` (or ``(1, H, W[, C])``).
      cmap, level, channel_axis: see :func:`heatmap`.
      scale: each pixel becomes ``scale × scale`` pixels (nearest neighbour), for small inputs.
    """
    _matplotlib()
    import matplotlib.image

    rgb = heatmap(relevance, cmap, level, channel_axis)
    if rgb.ndim == 4:
        if rgb.shape[0] != 1:
            raise ValueError(f"save_heatmap writes one image, got a batch of {rgb.shape[0]}: index it, or "
                             f"use grid() for several")
        rgb = rgb[0]
    rgb = _upscale(rgb, scale)
    matplotlib.image.imsave(os.fspath(path), rgb, format="png")
    return rgb


def _grey(image: Any) -> np.ndarray:
    """An input image as one grey channel ``(H, W)``: ``(H, W)``, ``(H, W, 1)`` or the channel mean of
    ``(H, W, C)``."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 3:
        x = x.mean(axis=-1)
    if x.ndim != 2:
        raise ValueError(f"an input image must be (H, W) or (H, W, C), got shape {np.shape(image)}")
    return x


def grid(images: Any, heatmaps_by_name: Mapping[str, Any], path: str | os.PathLike,
         titles: Sequence[str] | None = None, cmap: Any = "bwr", level: float | None = None,
         channel_axis: int | str | None = "auto", title: str | None = None, cell: float = 1.4,
         dpi: int = 150, colorbar: bool = True) -> None:
    """Write a labelled PNG figure: one row per sample, the input in grey first, then one column per entry
    of ``heatmaps_by_name`` (e.g. one per LRP preset).

    Args:
      images: the inputs, ``(N, H, W)`` or ``(N, H, W, C)`` (shown in grey, from black at the image's
        minimum to white at its maximum; colour images as their channel mean).
      heatmaps_by_name: column title → relevance of the ``N`` inputs, ``(N, H, W)`` or ``(N, H, W, C)``
        (raw relevance: each map is normalised on its own, see :func:`normalize`).
      path: the PNG file.
      titles: one label per row (e.g. ``"label 7 · pred 7"``), shown left of the row.
      cmap, level, channel_axis: see :func:`heatmap`.
      title: a figure title.
      cell: size of one panel in inches.
      dpi: resolution of the PNG.
      colorbar: draw the colour scale (normalised relevance from -1 to 1) below the grid.
    """
    _matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    images = np.asarray(images)
    n = images.shape[0]
    columns = {name: heatmap(r, cmap, level, channel_axis) for name, r in heatmaps_by_name.items()}
    for name, rgb in columns.items():
        rgb = rgb if rgb.ndim == 4 else rgb[None]
        if rgb.shape[0] != n:
            raise ValueError(f"heatmaps {name!r} hold {rgb.shape[0]} maps for {n} images")
        columns[name] = rgb
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} rows")
    n_cols = 1 + len(columns)
    # Layout in inches: panels of `cell` with gaps of `gap`, margins for row labels, column titles, the
    # figure title (wrapped to the figure's width) and the colour bar.
    gap = 0.06
    left = 0.35 if titles is not None else 0.08
    right = 0.08
    width = left + n_cols * cell + (n_cols - 1) * gap + right
    lines = textwrap.wrap(title, max(int(width * 14), 20)) if title else []
    top = 0.28 + 0.16 * len(lines) + (0.08 if lines else 0.0)
    bottom = 0.7 if colorbar else 0.08
    height = bottom + n * cell + (n - 1) * gap + top
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(n, n_cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height,
        "top": 1 - top / height, "wspace": gap / cell, "hspace": gap / cell})
    for i in range(n):
        grey = _grey(images[i])
        axes[i, 0].imshow(grey, cmap="gray", vmin=grey.min(), vmax=max(grey.max(), grey.min() + 1e-12),
                          interpolation="nearest")
        for j, rgb in enumerate(columns.values(), start=1):
            axes[i, j].imshow(rgb[i], interpolation="nearest")
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["input", *columns]):
        axes[0, j].set_title(name, fontsize=7, pad=3)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=8, y=1 - 0.06 / height, va="top")
    if colorbar:
        bar_width = min(2.4, width - 0.4)
        cax = fig.add_axes(((width - bar_width) / 2 / width, 0.42 / height, bar_width / width, 0.1 / height))
        bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), _colormap(cmap)), cax=cax,
                           orientation="horizontal")
        bar.set_ticks([-1, 0, 1])
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
        bar.set_label("relevance / max |relevance| per image" if level is None else
                      f"relevance / {level:g}th percentile of |relevance| per image", fontsize=6, labelpad=1)
    fig.savefig(os.fspath(path), dpi=dpi, format="png")


# -- tokens -------------------------------------------------------------------------------------------

_VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def _token_colours(relevance: Any, cmap: Any, level: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(normalised relevance ``(T,)`` in [-1, 1], RGB uint8 colours ``(T, 3)``) of one sequence."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"token relevance must be one value per token, shape (T,), got {r.shape}: "
                         f"index one sequence of a batch, and sum embedding features first (lrp does)")
    n = normalize(r[None, :, None], level, channel_axis=None)[0, :, 0] if r.size else r
    lut = _colormap(cmap).resampled(_LUT_SIZE)(np.arange(_LUT_SIZE))[:, :3]
    lut = np.rint(lut * 255).astype(np.uint8)
    return n, lut[np.rint((n + 1.0) / 2.0 * (_LUT_SIZE - 1)).astype(np.intp)]


def _shown(token: str) -> str:
    """The explained token as displayed: white space made visible (a predicted space is ``␣``)."""
    return "".join(_VISIBLE.get(ch, "␣" if ch == " " else ch) for ch in token) or "∅"


def _ink(rgb: np.ndarray) -> str:
    """Black or white text, whichever reads better on ``rgb`` (relative luminance, WCAG)."""
    c = rgb / 255.0
    lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return "#000000" if 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] > 0.179 else "#ffffff"


class TokenHeatmap:
    r"""Tokens coloured by relevance: HTML in notebooks (``_repr_html_``), PNG or PDF through matplotlib.

    Relevance is normalised symmetrically as for images (:func:`normalize`: ``R / max|R|``, or a
    percentile with ``level``), so 0 is the colour map's centre (white for ``"bwr"``) and the sign is
    kept. The explained token (the prediction at the end, or a token of the text) is drawn with a frame.

    Args:
      tokens: the tokens as strings, e.g. ``[tokenizer.decode(t) for t in ids]`` or the characters of a
        character model.
      relevance: ``(T,)`` one value per token (``lrp`` of token ids returns this shape).
      explained: what is explained. Either an index into ``tokens`` (framed), or a string, shown framed
        after the text (the predicted next token).
      cmap, level: see :func:`heatmap`.
      title: a caption above the tokens.
    """

    def __init__(self, tokens: Sequence[str], relevance: Any, explained: int | str | None = None,
                 cmap: Any = "bwr", level: float | None = None, title: str | None = None):
        self.tokens = [str(t) for t in tokens]
        if np.ndim(relevance) != 1:
            raise ValueError(f"token relevance must be one value per token, shape (T,), got "
                             f"{np.shape(relevance)}: index one sequence of a batch")
        if len(self.tokens) != int(np.size(relevance)):
            raise ValueError(f"{len(self.tokens)} tokens but {np.size(relevance)} relevance values")
        if isinstance(explained, (int, np.integer)) and not -len(self.tokens) <= explained < len(self.tokens):
            raise ValueError(f"explained={explained} is not an index of the {len(self.tokens)} tokens")
        self.relevance = np.asarray(relevance, dtype=np.float64).reshape(-1)
        self.explained = explained
        self.cmap, self.level, self.title = cmap, level, title
        self.normalized, self.colours = _token_colours(self.relevance, cmap, level)

    def _framed(self, i: int) -> bool:
        return isinstance(self.explained, (int, np.integer)) and i == self.explained % len(self.tokens)

    def to_html(self) -> str:
        """A self-contained HTML fragment (inline styles; long text wraps). Each token's tooltip shows
        its relevance."""
        import html

        spans = []
        for i, (tok, rgb, r) in enumerate(zip(self.tokens, self.colours, self.relevance)):
            text = "".join(_VISIBLE.get(ch, ch) for ch in tok)
            frame = "outline:2px solid #000;outline-offset:-1px;" if self._framed(i) else ""
            spans.append(f'<span title="{r:.4g}" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]});'
                         f'color:{_ink(rgb)};{frame}">{html.escape(text)}</span>'
                         + ("<br>" if "\n" in tok else ""))
        after = ""
        if isinstance(self.explained, str):
            after = (f' <span style="border:2px solid #000;padding:0 3px;margin-left:4px">→ '
                     f'{html.escape(_shown(self.explained))}</span>')
        caption = (f'<div style="font-size:0.85em;margin-bottom:4px">{html.escape(self.title)}</div>'
                   if self.title else "")
        return (f'<div class="lfp-tokens" style="font-family:monospace;white-space:pre-wrap;'
                f'line-height:1.7;overflow-wrap:anywhere">{caption}{"".join(spans)}{after}</div>')

    def _repr_html_(self) -> str:
        return self.to_html()

    def save_html(self, path: str | os.PathLike) -> None:
        """Write a standalone HTML page with the heatmap."""
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write('<!DOCTYPE html><html><head><meta charset="utf-8"><title>token relevance</title></head>'
                    f'<body style="max-width:50em;margin:1em auto">{self.to_html()}</body></html>')

    def save(self, path: str | os.PathLike, width: float = 7.0, fontsize: float = 11, dpi: int = 200,
             colorbar: bool = True) -> None:
        """Write the heatmap as a figure through matplotlib (PNG, PDF or SVG by the file's suffix).

        Tokens are laid out left to right in a monospace font and wrapped at ``width`` inches (and at
        newlines); each gets a box of its colour.
        """
        _matplotlib()
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        char_w = 0.6 * fontsize / 72        # monospace advance, inches
        line_h = 1.6 * fontsize / 72
        margin = 0.15
        usable = width - 2 * margin
        items = [("".join(_VISIBLE.get(ch, ch) for ch in t), rgb, self._framed(i), "\n" in t)
                 for i, (t, rgb) in enumerate(zip(self.tokens, self.colours))]
        if isinstance(self.explained, str):
            items.append(("→ " + _shown(self.explained), np.array([255, 255, 255], np.uint8), True, False))
        # wrap between words: a token is moved to the next line with the rest of its word (the tokens
        # up to the next one holding white space) when they do not fit; a word longer than a line breaks
        widths = [max(1, len(text)) * char_w for text, *_ in items]
        ends_word = [(not text.strip()) or text[-1:].isspace() or newline for text, _, _, newline in items]
        placed, x, row = [], 0.0, 0
        for i, (text, rgb, framed, newline) in enumerate(items):
            if isinstance(self.explained, str) and i == len(items) - 1:
                x += char_w                                   # a gap before the explained token
            word = 0.0
            for j in range(i, len(items)):
                word += widths[j]
                if ends_word[j]:
                    break
            word_start = i == 0 or ends_word[i - 1]
            if x > 0 and x + min(word, usable) > usable and (word_start or x + widths[i] > usable):
                x, row = 0.0, row + 1
            placed.append((x, row, widths[i], text, rgb, framed))
            x += widths[i]
            if newline:
                x, row = 0.0, row + 1
        rows = (placed[-1][1] + 1) if placed else 1
        top = 0.35 if self.title else margin
        bottom = 0.55 if colorbar else margin
        height = top + rows * line_h + bottom
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.axis("off")
        from matplotlib.patches import Rectangle

        for x0, r, w, text, rgb, framed in placed:
            y0 = top + r * line_h
            ax.add_patch(Rectangle((margin + x0, y0 + 0.1 * line_h), w, 0.8 * line_h, facecolor=rgb / 255,
                                   edgecolor="black" if framed else "none", linewidth=1.2 if framed else 0))
            ax.text(margin + x0 + w / 2, y0 + line_h / 2, text, ha="center", va="center", family="monospace",
                    fontsize=fontsize, color=_ink(rgb))
        if self.title:
            ax.text(margin, 0.2, self.title, fontsize=fontsize * 0.8, va="center")
        if colorbar:
            bar_w = min(2.4, width - 0.4)
            cax = fig.add_axes(((width - bar_w) / 2 / width, 0.3 / height, bar_w / width, 0.08 / height))
            bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), _colormap(self.cmap)), cax=cax,
                               orientation="horizontal")
            bar.set_ticks([-1, 0, 1])
            bar.ax.tick_params(labelsize=6, length=2, pad=1)
            bar.set_label("relevance / max |relevance|" if self.level is None else
                          f"relevance / {self.level:g}th percentile of |relevance|", fontsize=6, labelpad=1)
        fig.savefig(os.fspath(path), dpi=dpi)

    def treescope(self) -> Any:
        """The same relevance in treescope's view (needs ``treescope``, installed with penzai): the
        tokens as a 1-D array of relevance, coloured and labelled by token (``treescope.render_array``
        with the tokens as axis labels)."""
        try:
            import treescope
        except ImportError as e:
            raise ImportError("TokenHeatmap.treescope needs treescope "
                              "(pip install treescope, or penzai)") from e
        return treescope.render_array(self.relevance, axis_item_labels={0: self.tokens},
                                      vmin=-np.abs(self.relevance).max(), vmax=np.abs(self.relevance).max())


def tokens(tokens: Sequence[str], relevance: Any, explained: int | str | None = None, cmap: Any = "bwr",
           level: float | None = None, title: str | None = None) -> TokenHeatmap:
    """Token relevance as a :class:`TokenHeatmap`: displays itself in notebooks, ``.save("x.png")`` or
    ``.save_html("x.html")`` writes it.

    Example::

        from lfp_jax import plot, targets

        def lm_fn(params, ids):                    # (B, T) token ids -> (B, T, V) logits
            return lm.apply({"params": params}, ids)

        logits = lm_fn(lm_params, ids)
        target = targets.token(logits, next_token)   # the next token's logit at the last position
        _, per_token = jax.jit(lfp_jax.lrp(lm_fn))(lm_params, ids, target=target)
        vocab = [f"w{i} " for i in range(logits.shape[-1])]
        plot.tokens([vocab[i] for i in ids[0]], per_token[0], explained=vocab[next_token[0]])
    """
    return TokenHeatmap(tokens, relevance, explained, cmap, level, title)
