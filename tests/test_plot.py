"""lfp_jax.plot: normalisation, colours and PNG output against hand-computed values."""

import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402
import matplotlib.image  # noqa: E402

from lfp_jax import plot  # noqa: E402

R = np.array([[2.0, -2.0], [1.0, 4.0]])  # max |R| = 4: normalised [[.5, -.5], [.25, 1]]


def test_normalize_divides_by_the_largest_magnitude():
    np.testing.assert_array_equal(plot.normalize(R), [[0.5, -0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(plot.normalize(-R), -plot.normalize(R))


def test_normalize_at_a_percentile_level_clips():
    # |R| = 2, 2, 1, 4: the 50th percentile is 2, so R / 2 = [[1, -1], [.5, 2]], clipped to [-1, 1].
    np.testing.assert_array_equal(plot.normalize(R, level=50), [[1.0, -1.0], [0.5, 1.0]])
    np.testing.assert_array_equal(plot.normalize(R, level=100), plot.normalize(R))
    with pytest.raises(ValueError, match="percentile"):
        plot.normalize(R, level=0)


def test_normalize_sums_channels_and_treats_each_image_alone():
    hwc = np.stack([R, R, -0.5 * R], axis=-1)  # channel sum: 1.5 R
    np.testing.assert_allclose(plot.normalize(hwc), plot.normalize(R))
    batch = np.stack([hwc, 10 * hwc, np.zeros_like(hwc)])  # (N, H, W, C); an image scaled by 10; zeros
    out = plot.normalize(batch)
    assert out.shape == (3, 2, 2)
    np.testing.assert_allclose(out[0], plot.normalize(R))
    np.testing.assert_allclose(out[1], plot.normalize(R))
    np.testing.assert_array_equal(out[2], 0.0)  # a map of zeros stays zeros (no 0/0)
    nchw = np.moveaxis(batch, -1, 1)
    np.testing.assert_allclose(plot.normalize(nchw, channel_axis=1), out)


def test_reduce_channels_layouts():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 8, 8))  # (N, H, W): last axis longer than 4, nothing summed
    np.testing.assert_array_equal(plot.reduce_channels(maps), maps)
    np.testing.assert_array_equal(plot.reduce_channels(maps[..., :3], channel_axis=None), maps[..., :3])
    np.testing.assert_allclose(plot.reduce_channels(maps[..., :3]), maps[..., :3].sum(-1))  # (H, W, C)
    with pytest.raises(ValueError, match="channel_axis"):
        plot.reduce_channels(np.zeros((1, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        plot.reduce_channels(np.zeros((2, 3, 4, 5)), channel_axis=None)


def test_heatmap_colours_of_bwr():
    rgb = plot.heatmap(R, cmap="bwr")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    # (R̂ + 1) / 2 = .75, .25, .625, 1 in bwr (blue 0, white .5, red 1), 255-scaled and rounded.
    np.testing.assert_array_equal(rgb, [[[255, 128, 128], [128, 128, 255]], [[255, 191, 191], [255, 0, 0]]])
    np.testing.assert_array_equal(plot.heatmap(np.zeros((3, 3)), cmap="bwr"), 255)  # 0 → white


def test_heatmap_colours_of_coldnhot():
    rgb = plot.heatmap(R, cmap="coldnhot")
    # .75 red, .25 blue, 1 yellow; .625 halfway between black (.5) and red (.75).
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 255])
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 0])
    assert abs(int(rgb[1, 0, 0]) - 128) <= 1 and rgb[1, 0, 1] == rgb[1, 0, 2] == 0
    np.testing.assert_array_equal(plot.heatmap(-R, cmap="coldnhot")[1, 1], [0, 255, 255])  # cyan
    np.testing.assert_array_equal(plot.heatmap(np.zeros((3, 3)), cmap="coldnhot"), 0)  # 0 → black


@pytest.mark.parametrize("cmap", ["bwr", "coldnhot"])
def test_heatmap_of_negated_relevance_is_the_mirrored_colour(cmap):
    r = np.random.default_rng(1).normal(size=(4, 10, 10, 3))
    pos, neg = plot.heatmap(r, cmap), plot.heatmap(-r, cmap)
    assert pos.shape == (4, 10, 10, 3)
    np.testing.assert_array_equal(neg, pos[..., ::-1])  # red and blue exchanged


def test_coldnhot_is_registered_with_matplotlib():
    plot.register_colormaps()
    plot.register_colormaps()  # idempotent
    cmap = matplotlib.colormaps[plot.COLDNHOT]
    np.testing.assert_allclose(cmap(0.0)[:3], (0, 1, 1))
    np.testing.assert_allclose(cmap(1.0)[:3], (1, 1, 0))
    np.testing.assert_allclose(cmap(cmap.N // 2)[:3], (0, 0, 0))
    with pytest.raises(ValueError, match="unknown colour map"):
        plot.heatmap(R, cmap="no_such_map")


def test_save_heatmap_writes_a_png(tmp_path):
    path = tmp_path / "h.png"
    rgb = plot.save_heatmap(path, np.stack([R, R], -1), cmap="bwr", scale=3)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (6, 6) and image.shape[2] in (3, 4)
    np.testing.assert_allclose(image[..., :3] * 255, rgb, atol=0.5)
    np.testing.assert_array_equal(rgb[:3, :3], np.broadcast_to(plot.heatmap(R)[0, 0], (3, 3, 3)))
    with pytest.raises(ValueError, match="one image"):
        plot.save_heatmap(tmp_path / "b.png", np.zeros((2, 4, 4, 1)))


def test_grid_writes_a_labelled_figure(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, size=(3, 12, 12, 1))
    maps = {"a": rng.normal(size=(3, 12, 12, 1)), "b": rng.normal(size=(3, 12, 12))}
    path = tmp_path / "grid.png"
    plot.grid(images, maps, path, titles=["x", "y", "z"], cmap="coldnhot", title="three rows", dpi=50)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > image.shape[1] > 50  # 3 rows, 3 columns, colour bar
    wide = tmp_path / "wide.png"
    plot.grid(images, {**maps, "c": maps["a"], "d": maps["b"]}, wide, dpi=50, colorbar=False)
    assert matplotlib.image.imread(wide).shape[1] > image.shape[1]
    with pytest.raises(ValueError, match="2 maps for 3 images"):
        plot.grid(images, {"a": maps["a"][:2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="titles"):
        plot.grid(images, maps, tmp_path / "bad.png", titles=["x"])


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install matplotlib.*lfp-jax\[plot\]"):
        plot.heatmap(R)


def test_token_colours_of_bwr_and_text_ink():
    # relevance (2, -4, 0, 1): normalised (.5, -1, 0, .25); bwr is blue (0,0,1) - white - red (1,0,0)
    h = plot.tokens(["a", "b", "c", "d"], np.array([2.0, -4.0, 0.0, 1.0]))
    np.testing.assert_allclose(h.normalized, [0.5, -1.0, 0.0, 0.25])
    np.testing.assert_array_equal(h.colours[1], [0, 0, 255])          # most negative: pure blue
    np.testing.assert_array_equal(h.colours[2], [255, 255, 255])      # zero: white
    np.testing.assert_array_equal(h.colours[0], [255, 128, 128])      # (0.5 + 1) / 2 = .75: as heatmap()
    html = h.to_html()
    assert 'background:rgb(0,0,255);color:#ffffff' in html             # white text on blue
    assert 'background:rgb(255,255,255);color:#000000' in html         # black text on white


def test_token_html_escapes_marks_and_shows_whitespace():
    h = plot.tokens(["<b>", " x", "\n", "y"], [1.0, 0.0, -1.0, 0.5], explained=-1)
    html = h._repr_html_()
    assert "&lt;b&gt;" in html and "<b>" not in html.replace("<br>", "")
    assert "⏎" in html and "<br>" in html                              # a newline is visible and breaks
    assert html.count("outline:2px solid") == 1                         # the explained token, framed
    framed = html.split("outline:2px solid")[0].rsplit("<span", 1)[1]
    assert "rgb(255,128,128)" in framed                                 # ... is "y", relevance 0.5 of 1
    nxt = plot.tokens(["a", "b"], [1.0, -1.0], explained="c", title="why c?")
    assert "→ c" in nxt.to_html() and "why c?" in nxt.to_html()


def test_token_figure_wraps_long_text(tmp_path):
    words = ("relevance " * 40).split(" ")[:-1]
    toks = [t + " " for t in words]
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    plot.tokens(toks[:3], np.ones(3), explained="x").save(short, width=6, dpi=50)
    plot.tokens(toks, np.linspace(-1, 1, len(toks)), explained="x").save(long, width=6, dpi=50)
    a, b = matplotlib.image.imread(short), matplotlib.image.imread(long)
    assert a.shape[1] == b.shape[1] == 300                              # 6 inches at 50 dpi, wrapped
    line = 1.6 * 11 / 72 * 50                                           # one line of 11 pt text, pixels
    # 40 words of 10 characters at 6.6 pt each (0.917 in): 6 per 5.7-inch line, so 7 lines against 1
    assert b.shape[0] - a.shape[0] == pytest.approx(6 * line, abs=2)
    pdf = tmp_path / "t.pdf"
    plot.tokens(toks[:5], np.ones(5)).save(pdf)
    assert pdf.read_bytes().startswith(b"%PDF")


def test_token_errors():
    with pytest.raises(ValueError, match="3 tokens but 2"):
        plot.tokens(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="not an index"):
        plot.tokens(["a"], [1.0], explained=3)
    with pytest.raises(ValueError, match="one value per token"):
        plot.tokens(["a", "b"], np.ones((1, 2)))                       # a batch of one, not indexed


def test_explained_white_space_is_visible():
    assert "→ ␣" in plot.tokens(["a"], [1.0], explained=" ").to_html()
    assert "→ ⏎" in plot.tokens(["a"], [1.0], explained="\n").to_html()


# treescope reads numpy's deprecated chararray while it indexes numpy (numpy >= 2.3, Python 3.12's
# environment): treescope's warning, not ours
@pytest.mark.filterwarnings("ignore:The chararray class is deprecated:DeprecationWarning")
def test_treescope_view_when_installed():
    pytest.importorskip("treescope")
    figure = plot.tokens(["a", "b", "c"], [1.0, -2.0, 0.5]).treescope()
    html = figure._repr_html_() if hasattr(figure, "_repr_html_") else str(figure)
    assert "treescope" in html.lower() or len(html) > 100
