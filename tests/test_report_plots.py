"""Report figures and HTML page (vlprompt.protocols.plots / .html): hand-made result rows, no model needed."""

from __future__ import annotations

import math
import struct
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

pytest.importorskip("matplotlib")

from vlprompt.protocols import plots  # noqa: E402
from vlprompt.protocols.html import table_html, write_html  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 150


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------


def _row(protocol, dataset, method, method_type, shots, mean, std=None, *, metric="top1", source=None,
         backbone="RN50", n=3, random=False):
    return {
        "protocol": protocol, "dataset": dataset, "source": source or dataset, "method": method,
        "method_type": method_type, "backbone": backbone, "shots": shots, "metric": metric,
        "mean": mean, "std": std, "n": n, "random": random,
        "published": None, "published_source": None, "diff": None,
    }


def _mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, s


def fewshot_rows(backbone="RN50", random=False):
    """2 datasets + average; zero-shot once, coop and cpt at 1/2/4 shots over 3 seeds."""
    seeds = {  # dataset -> method -> shots -> per-seed top-1
        "caltech101": {"coop": {1: [87.1, 88.0, 87.6], 2: [87.9, 88.4, 88.9], 4: [89.2, 89.8, 89.5]},
                       "cpt": {1: [88.0, 88.6, 88.2], 2: [88.9, 89.1, 89.6], 4: [90.1, 90.4, 89.9]}},
        "oxford_pets": {"coop": {1: [85.3, 86.4, 85.9], 2: [82.2, 83.0, 82.9], 4: [86.5, 86.9, 86.6]},
                        "cpt": {1: [86.0, 87.1, 86.4], 2: [85.9, 86.3, 86.0], 4: [87.2, 87.6, 87.5]}},
    }
    zeroshot = {"caltech101": 86.29, "oxford_pets": 85.77}
    rows = []
    for ds, acc in zeroshot.items():
        rows.append(_row("fewshot", ds, "zeroshot", "zeroshot", 0, acc, None, backbone=backbone, n=1,
                         random=random))
    rows.append(_row("fewshot", "average", "zeroshot", "zeroshot", 0, sum(zeroshot.values()) / 2, None,
                     backbone=backbone, n=1, random=random))
    for method in ("coop", "cpt"):
        for k in (1, 2, 4):
            means = []
            for ds in seeds:
                m, s = _mean_std(seeds[ds][method][k])
                means.append(m)
                rows.append(_row("fewshot", ds, method, method, k, m, s, backbone=backbone, random=random))
            rows.append(_row("fewshot", "average", method, method, k, sum(means) / len(means), None,
                             backbone=backbone, random=random))
    return rows


def base2new_rows(backbone="RN50", random=False):
    acc = {  # dataset -> method -> (base, new)
        "caltech101": {"zeroshot": (96.84, 94.00), "coop": (98.00, 89.81), "cpt": (97.90, 93.10)},
        "oxford_pets": {"zeroshot": (91.17, 97.26), "coop": (93.67, 95.29), "cpt": (94.80, 96.60)},
        "dtd": {"zeroshot": (53.24, 59.90), "coop": (79.44, 41.18), "cpt": (78.50, 55.20)},
    }
    rows = []
    methods = ("zeroshot", "coop", "cpt")
    avg = {m: [[], []] for m in methods}
    for ds, by in acc.items():
        for method, (b, nw) in by.items():
            h = 2 * b * nw / (b + nw)
            mt = "zeroshot" if method == "zeroshot" else method
            shots = 0 if method == "zeroshot" else 16
            std = None if method == "zeroshot" else 0.6
            for metric, v in (("base", b), ("new", nw), ("h", h)):
                rows.append(_row("base2new", ds, method, mt, shots, v, std, metric=metric, backbone=backbone,
                                 random=random))
            avg[method][0].append(b)
            avg[method][1].append(nw)
    for method in methods:
        b = sum(avg[method][0]) / 3
        nw = sum(avg[method][1]) / 3
        mt = "zeroshot" if method == "zeroshot" else method
        shots = 0 if method == "zeroshot" else 16
        for metric, v in (("base", b), ("new", nw), ("h", 2 * b * nw / (b + nw))):
            rows.append(_row("base2new", "average", method, mt, shots, v, None, metric=metric, backbone=backbone,
                             random=random))
    return rows


def transfer_rows(protocol, targets, backbone="RN50", random=False):
    """Source imagenet (reported, not averaged), the targets and the average over the targets."""
    base = {"zeroshot": 60.3, "zeroshot_ensemble": 61.6, "coop": 63.0, "cpt": 63.5}
    rows = []
    for method, src_acc in base.items():
        mt = method
        shots = 0 if method.startswith("zeroshot") else 16
        std = None if shots == 0 else 0.3
        label = "zs-ens" if method == "zeroshot_ensemble" else method
        rows.append(_row(protocol, "imagenet", label, mt, shots, src_acc, std, source="imagenet",
                         backbone=backbone, random=random))
        tvals = []
        for i, t in enumerate(targets):
            v = src_acc - 8.0 * (i + 1) + (0.4 if method == "cpt" else 0.0)
            tvals.append(v)
            rows.append(_row(protocol, t, label, mt, shots, v, std, source="imagenet", backbone=backbone,
                             random=random))
        rows.append(_row(protocol, "average", label, mt, shots, sum(tvals) / len(tvals), None, source="imagenet",
                         backbone=backbone, random=random))
    return rows


def all_rows(backbone="RN50", random=False):
    return (fewshot_rows(backbone, random) + base2new_rows(backbone, random)
            + transfer_rows("xd", ["caltech101", "oxford_pets"], backbone, random)
            + transfer_rows("dg", ["imagenet_v2", "imagenet_sketch"], backbone, random))


# ----------------------------------------------------------------------------------------------------------------
# File checks
# ----------------------------------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path.name}: first chunk is not IHDR"
    return struct.unpack(">II", data[16:24])


def expected_size(kind, n_panels=1, n_groups=1, n_bars=1) -> tuple[float, float]:
    """The rule documented in plots.figure_size, written out again so that a change there is caught here."""
    if kind == "fewshot":
        cols = min(n_panels, 4)
        rows = math.ceil(n_panels / cols)
        return max(6.0, 3.6 * cols), 3.0 * rows + 1.3
    return max(6.5, 1.6 + n_groups * (0.35 + 0.16 * n_bars)), 2.6 * n_panels + 1.9


def assert_png(path: Path, inches: tuple[float, float]) -> None:
    w, h = png_size(path)
    ew, eh = inches[0] * DPI, inches[1] * DPI
    assert abs(w - ew) <= 2 and abs(h - eh) <= 2, f"{path.name}: {w}x{h} px, expected about {ew:.0f}x{eh:.0f}"


def assert_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF"), f"{path.name}: no %PDF header"
    assert data.rstrip().endswith(b"%%EOF"), f"{path.name}: no %%EOF trailer"


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """All four protocols written once: (folder, paths returned)."""
    out = tmp_path_factory.mktemp("report") / "figures"
    return out, plots.write_plots(all_rows(), out)


def test_write_plots_files_sizes_and_formats(plotted):
    tmp_path, written = plotted
    stems = ["fewshot_RN50", "base2new_RN50", "xd_RN50_imagenet", "dg_RN50_imagenet"]
    expected = [tmp_path / f"{s}.{ext}" for s in stems for ext in ("png", "pdf")]
    assert sorted(written) == sorted(expected)
    assert sorted(tmp_path.iterdir()) == sorted(expected)

    # few-shot: 2 datasets + average = 3 panels in one row
    assert_png(tmp_path / "fewshot_RN50.png", expected_size("fewshot", 3))
    # base2new: 3 stacked panels, 3 datasets + average, 3 methods
    assert_png(tmp_path / "base2new_RN50.png", expected_size("base2new", 3, 4, 3))
    # xd / dg: 1 panel, source + 2 targets + average, 4 methods
    assert_png(tmp_path / "xd_RN50_imagenet.png", expected_size("xd", 1, 4, 4))
    assert_png(tmp_path / "dg_RN50_imagenet.png", expected_size("dg", 1, 4, 4))
    for s in stems:
        assert_pdf(tmp_path / f"{s}.pdf")


def test_figure_size_rule_matches_documented_formula():
    for n in range(1, 13):
        assert plots.figure_size("fewshot", n) == pytest.approx(expected_size("fewshot", n))
    for groups in (1, 4, 12):
        for bars in (1, 3, 7):
            assert plots.figure_size("base2new", 3, groups, bars) == pytest.approx(
                expected_size("base2new", 3, groups, bars))
            assert plots.figure_size("xd", 1, groups, bars) == pytest.approx(expected_size("xd", 1, groups, bars))


def test_many_datasets_wrap_into_rows(tmp_path):
    rows = []
    names = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "dtd"]
    for i, ds in enumerate(names + ["average"]):
        rows.append(_row("fewshot", ds, "zeroshot", "zeroshot", 0, 50.0 + i, n=1))
        for k in (1, 2, 4, 8, 16):
            rows.append(_row("fewshot", ds, "coop", "coop", k, 45.0 + i + 3 * math.log2(k), 0.5))
    written = plots.write_plots(rows, tmp_path)
    assert [p.name for p in written] == ["fewshot_RN50.png", "fewshot_RN50.pdf"]
    # 7 panels -> 4 columns, 2 rows
    assert_png(tmp_path / "fewshot_RN50.png", expected_size("fewshot", 7))
    assert expected_size("fewshot", 7) == pytest.approx((14.4, 7.3))


def test_one_set_per_backbone_and_sanitised_names(tmp_path):
    rows = fewshot_rows("RN50") + fewshot_rows("ViT-B/16") + transfer_rows("xd", ["dtd"], "ViT-B/16")
    names = sorted(p.name for p in plots.write_plots(rows, tmp_path))
    assert names == sorted([
        "fewshot_RN50.png", "fewshot_RN50.pdf", "fewshot_ViT-B-16.png", "fewshot_ViT-B-16.pdf",
        "xd_ViT-B-16_imagenet.png", "xd_ViT-B-16_imagenet.pdf",
    ])
    assert plots.sanitize_name("ViT-B/16") == "ViT-B-16"
    assert plots.sanitize_name("ViT L/14@336px") == "ViT-L-14-336px"


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert plots.write_plots([], tmp_path) == []
    rows = [dict(r, mean=None) for r in base2new_rows()]
    assert plots.write_plots(rows, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def _suptitle(fig) -> str:
    getter = getattr(fig, "get_suptitle", None)
    return getter() if getter is not None else fig._suptitle.get_text()


def test_random_weights_note_in_titles():
    note = plots.RANDOM_NOTE
    assert note == "(random weights: pipeline check only)"
    real = plots.make_figures(all_rows(random=False))
    rand = plots.make_figures(all_rows(random=True))
    assert [s for s, _ in real] == [s for s, _ in rand] == [
        "fewshot_RN50", "base2new_RN50", "xd_RN50_imagenet", "dg_RN50_imagenet"]
    for stem, fig in real:
        assert note not in _suptitle(fig), stem
        assert "RN50" in _suptitle(fig)
    for stem, fig in rand:
        assert note in _suptitle(fig), stem
    # One random row among real ones is enough; it only marks the figure it is plotted in.
    mixed = fewshot_rows() + base2new_rows()
    mixed[0] = dict(mixed[0], random=True)
    titles = {stem: _suptitle(fig) for stem, fig in plots.make_figures(mixed)}
    assert note in titles["fewshot_RN50"]
    assert note not in titles["base2new_RN50"]
    assert plots.figure_title("xd", "RN50", [{"random": True}], source="imagenet").endswith(note)
    assert note not in plots.figure_title("xd", "RN50", [{"random": False}], source="imagenet")


def test_fewshot_figure_content():
    (stem, fig), = plots.make_figures(fewshot_rows())
    assert stem == "fewshot_RN50"
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["Caltech101", "OxfordPets", "Average over 2 datasets"]
    ax = axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "4"]
    ticks = list(ax.get_xticks())
    assert ticks == pytest.approx([-1.0, 0.0, 1.0, 2.0])  # log2 spacing, 0 one octave left of 1
    # the zero-shot dashed line spans the panel at the zero-shot accuracy
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([86.29, 86.29])
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == ["zeroshot", "coop", "cpt"]


def test_transfer_group_order():
    rows = transfer_rows("xd", ["caltech101", "oxford_pets"])
    rows = rows[-3:] + rows[:-3]  # order of rows must not decide the order of the groups
    (stem, fig), = plots.make_figures(rows)
    assert stem == "xd_RN50_imagenet"
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["ImageNet (source)", "Caltech101", "OxfordPets", "Average (targets)"]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.values: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            self.values.append(value or "")
            if name in ("src", "href"):
                self.refs.append((tag, name, value or ""))


def test_write_html_is_self_contained(plotted):
    figs, written = plotted
    out = figs.parent
    pngs = [p for p in written if p.suffix == ".png"]
    table = table_html(["dataset", "coop", "cpt"], [["caltech101", "88.3 ± 0.5", "89.0"], ["a<b & c", "1", "2"]],
                       caption="Few-shot, 16 shots")
    page = write_html(out, "Study <x> & results", [("Few-shot", table), ("Base-to-new", table)], pngs)
    assert page == out / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "<table>" in text and "a&lt;b &amp; c" in text
    assert "<title>Study &lt;x&gt; &amp; results</title>" in text
    assert "<script" not in text.lower()

    parser = _Refs()
    parser.feed(text)
    srcs = [v for tag, name, v in parser.refs if name == "src"]
    hrefs = [v for tag, name, v in parser.refs if name == "href"]
    assert len(srcs) == len(pngs) == 4
    assert len(hrefs) == 4  # the PDF beside each PNG
    for _, _, value in parser.refs:
        assert not value.startswith(("/", "file:")), value
        target = out / unquote(value)
        assert target.is_file(), f"{value} does not exist relative to {out}"
    for value in parser.values:
        assert not value.lower().startswith(("http://", "https://")), value
    assert "http://" not in text and "https://" not in text
    assert all(h.endswith(".pdf") for h in hrefs)


def test_write_html_without_pdf_and_outside_dir(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    png = other / "fig one.png"
    png.write_bytes(PNG_SIGNATURE + b"\0" * 16)
    out = tmp_path / "report"
    page = write_html(out, "t", [], [png, out / "missing.png"])
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.refs == [("img", "src", "../elsewhere/fig%20one.png")]
    assert (out / unquote(parser.refs[0][2])).is_file()


def test_table_html_escapes_cells():
    t = table_html(["<h>", "a&b"], [["<script>alert(1)</script>", "x & y"], [1.5, None]], caption="c<1>")
    assert "<script>" not in t
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in t
    assert "<th>&lt;h&gt;</th>" in t and "<th>a&amp;b</th>" in t
    assert "x &amp; y" in t
    assert "<caption>c&lt;1&gt;</caption>" in t
    assert t.startswith("<table>") and t.rstrip().endswith("</table>")
    assert "<thead>" in t and "</thead>" in t and "<tbody>" in t and "</tbody>" in t
    assert '<td class="num">1.5</td>' in t

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells, self._in = [], False

        def handle_starttag(self, tag, attrs):
            self._in = tag in ("td", "th")

        def handle_endtag(self, tag):
            self._in = False

        def handle_data(self, data):
            if self._in:
                self.cells.append(data)

    p = Cells()
    p.feed(t)
    assert p.cells == ["<h>", "a&b", "<script>alert(1)</script>", "x & y", "1.5"]
