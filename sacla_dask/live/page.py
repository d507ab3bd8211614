"""The live page of ``follow --serve PORT``: a Bokeh server in the follower's process.

:func:`serve_page` starts a :class:`bokeh.server.server.Server` on
``127.0.0.1:PORT`` in a thread of its own (its own asyncio loop); each
browser session gets a document (:func:`make_document`) whose periodic
callback (every second) redraws from the follower's
:class:`~sacla_dask.live.follow.LiveStatus` when it changed: the current
correlation map ``C(q, dphi)``, its profile at a chosen q with the SEM
band, the angular Fourier coefficients ``c_n`` at that q against the number
of pairs (convergence), and the counts: shots/s, tags, bright/dark, pairs,
rejected pairs, lag behind the source. The page title carries the tag and
pair counts. Nothing is read from the store: the follower hands the page
what it has just written.
"""

from __future__ import annotations

import asyncio
import html
import threading
from typing import Any

import numpy as np

from .follow import HISTORY_ORDERS, LiveStatus

#: Fourier orders drawn against the number of pairs
SHOWN_ORDERS = (2, 4, 6, 8)
#: fraction of 2 pi left out at each end of dphi in the map and profile (self-correlation)
CUT = 0.05


def _title(st: LiveStatus) -> str:
    return f"sacla-dask live: {st.n_tags} tags, {st.n_pairs} pairs"


def make_document(status: LiveStatus, period_ms: int = 1000) -> Any:
    """The Bokeh application function: fills a document that follows ``status``."""
    from bokeh.layouts import column, row
    from bokeh.models import (  # type: ignore[attr-defined]
        Band,
        ColorBar,
        ColumnDataSource,
        Div,
        LinearColorMapper,
        Slider,
    )
    from bokeh.palettes import Category10, Viridis256
    from bokeh.plotting import figure

    def app(doc: Any) -> None:
        img = ColumnDataSource({"image": [np.zeros((1, 1))], "x": [0.0], "y": [0.0],
                                "dw": [1.0], "dh": [1.0]})
        prof = ColumnDataSource({"dphi": [], "c": [], "lo": [], "hi": []})
        conv = ColumnDataSource({"pairs": [], **{f"c{n}": [] for n in SHOWN_ORDERS}})
        mapper = LinearColorMapper(palette=Viridis256)
        fmap = figure(title="C(q, dphi): mean over pairs", width=560, height=360,
                      x_axis_label="dphi (rad)", y_axis_label="q (1/A)")
        fmap.image(image="image", x="x", y="y", dw="dw", dh="dh", source=img,
                   color_mapper=mapper)  # type: ignore[call-arg]
        fmap.add_layout(ColorBar(color_mapper=mapper, width=10), "right")
        fprof = figure(title="C(dphi) at q, +/- 1 s.e.m.", width=560, height=300,
                       x_axis_label="dphi (rad)", y_axis_label="C")
        fprof.add_layout(Band(base="dphi", lower="lo", upper="hi", source=prof,
                              fill_alpha=0.3, fill_color="steelblue", line_color=None))
        fprof.line("dphi", "c", source=prof, line_width=1.5)
        fconv = figure(title="Fourier coefficients c_n at q against pairs (convergence)",
                       width=560, height=300, x_axis_label="pairs", y_axis_label="c_n")
        for i, n in enumerate(SHOWN_ORDERS):
            fconv.line("pairs", f"c{n}", source=conv, legend_label=f"n = {n}",
                       color=Category10[10][i], line_width=1.5)
        fconv.legend.location = "top_left"
        slider = Slider(title="q row of the profile", start=0, end=1, value=0, step=1,
                        width=560)
        stats = Div(text="waiting for data", width=560)
        seen = {"version": -1, "q": -1, "first": True}

        def draw() -> None:
            with status.lock:
                st = {k: getattr(status, k) for k in (
                    "version", "state", "n_tags", "n_bright", "n_dark", "n_selected",
                    "n_pairs", "n_rejected", "last_tag", "shots_per_s", "lag_s", "backlog",
                    "q", "dphi", "corr", "sem", "fourier", "history", "started")}
            if st["version"] == seen["version"] and int(slider.value) == seen["q"]:
                return
            seen["version"] = st["version"]
            doc.title = (f"sacla-dask live: {st['n_tags']} tags, {st['n_pairs']} pairs")
            stats.text = (
                f"<b>{html.escape(str(st['state']))}</b><br>"
                f"tags {st['n_tags']} (last {st['last_tag']}): {st['n_bright']} bright, "
                f"{st['n_dark']} dark, {st['n_selected']} selected<br>"
                f"pairs <b id='pairs'>{st['n_pairs']}</b>, rejected {st['n_rejected']}<br>"
                f"{st['shots_per_s']:.1f} shots/s; lag behind the source "
                f"{st['lag_s']:.2f} s; blocks waiting {st['backlog']}")
            corr, q, dphi = st["corr"], st["q"], st["dphi"]
            if corr is None or q is None or dphi is None:
                return
            nq, nphi = corr.shape
            if seen["first"]:
                slider.end = max(1, nq - 1)
                slider.value = int(np.nanargmax(np.nanmean(np.abs(corr), axis=1))
                                   if np.isfinite(corr).any() else 0)
                seen["first"] = False
            qi = int(min(max(int(slider.value), 0), nq - 1))
            seen["q"] = int(slider.value)
            lo = int(CUT * nphi)
            hi = nphi - lo
            part = corr[:, lo:hi]
            img.data = {"image": [np.nan_to_num(part)], "x": [float(dphi[lo])],
                        "y": [float(q[0])], "dw": [float(dphi[hi - 1] - dphi[lo])],
                        "dh": [float(q[-1] - q[0]) or 1.0]}
            finite = part[np.isfinite(part)]
            if finite.size:
                mapper.low, mapper.high = (float(np.percentile(finite, 1)),
                                           float(np.percentile(finite, 99)))
            c = corr[qi, lo:hi]
            s = np.nan_to_num(st["sem"][qi, lo:hi])
            prof.data = {"dphi": dphi[lo:hi], "c": c, "lo": c - s, "hi": c + s}
            fprof.title.text = (  # type: ignore[union-attr]
                f"C(dphi) at q = {q[qi]:.4f} 1/A (row {qi}), +/- 1 s.e.m.")
            hist = st["history"]
            if hist:
                cols = [HISTORY_ORDERS.index(n) for n in SHOWN_ORDERS]
                conv.data = {"pairs": [h[0] for h in hist],
                             **{f"c{n}": [float(h[1][qi, j]) for h in hist]
                                for n, j in zip(SHOWN_ORDERS, cols, strict=True)}}
            fconv.title.text = (  # type: ignore[union-attr]
                f"c_n at q = {q[qi]:.4f} 1/A against pairs (convergence)")

        doc.title = "sacla-dask live"
        draw()
        doc.add_root(column(row(column(stats, slider, fmap), column(fprof, fconv))))
        doc.add_periodic_callback(draw, period_ms)

    return app


class PageServer:
    """A running page server (in its own thread); :meth:`stop` ends it."""

    def __init__(self, status: LiveStatus, port: int, address: str = "127.0.0.1") -> None:
        self.port = port
        self.address = address
        self._status = status
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="live-page", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            from bokeh.application import Application
            from bokeh.application.handlers.function import FunctionHandler
            from bokeh.server.server import Server

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            origins = [f"{h}:{self.port}" for h in ("127.0.0.1", "localhost")]
            self._server = Server({"/": Application(FunctionHandler(
                make_document(self._status)))}, port=self.port, address=self.address,
                allow_websocket_origin=origins)
            self._server.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._server.io_loop.start()

    def stop(self) -> None:
        srv = self._server
        if srv is None:
            return
        loop = srv.io_loop

        def _stop() -> None:
            srv.stop()
            loop.stop()

        loop.add_callback(_stop)
        self._thread.join(10)
        self._server = None


def serve_page(status: LiveStatus, port: int, address: str = "127.0.0.1") -> PageServer:
    """Serve the live page of ``status`` at ``http://ADDRESS:PORT/`` (a thread; returns it)."""
    return PageServer(status, port, address)


__all__ = ["PageServer", "make_document", "serve_page"]
