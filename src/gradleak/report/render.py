"""``gradleak report``: one self-contained HTML page a privacy officer can read.

It reads a sweep folder (``results.jsonl``, the cells' pictures, the utility runs) or a single experiment or
attack folder (``metrics.json``) through the result store and writes ``report.html`` beside it, with every
picture embedded (no network, no scripts) and the plot also as a PNG file (``privacy_utility.png``). The
page holds:

* the bottom line and a verdict per defence setting in plain language;
* a summary table per defence and strength: PSNR, SSIM, MS-SSIM, patient re-identification, IIP, model
  utility (ROC AUC, accuracy), bits per update and epsilon -- for the strongest attack on that setting
  (the worst case for the defender), every column naming its metric variant;
* image grids: the originals above their reconstruction under each defence;
* the privacy-utility plot: leakage against model utility, one point per defence setting, the unprotected
  model marked;
* the details: every setting x attack, failed cells, threat models and definitions.

Verdicts (stated on the page, defined in :mod:`gradleak.report.verdicts` and docs/verdicts.md) are judged on
the gain of the reconstruction over the blind baseline (the attacker's guess without the update) and on
leave-the-image-out patient re-identification, never on raw SSIM; an attack that stopped before converging,
or an ``auto`` run that left a leaky layer's update unseparated or whose images do not reproduce an exact update
(or the entries a sparsifying client sent), makes a setting *inconclusive*, never *low risk*. Every verdict shows
the attack's budget. They are rules of thumb, not guarantees.

What the page says comes from :mod:`gradleak.report.page` as plain data; the template
``templates/report.html.j2`` lays it out with autoescaping on, so any text from the results (paths, setting
and attack names, obfuscation parameters, errors) is escaped. The stylesheet ``static/report.css`` is
inlined into the page.
"""

from __future__ import annotations

import functools
import time
from importlib import resources
from pathlib import Path

import jinja2
from markupsafe import Markup

from ..errors import UserError
from ..experiment.store import read_results, read_utilities
from ..files import write_bytes, write_text
from .grids import TILE, image_grids
from .page import context
from .plots import data_uri, privacy_utility_plot
from .summary import bits, fmt
from .verdicts import HIGH_REID, PARTLY_SKILL, RECOGNISABLE_SKILL

TEMPLATE = "report.html.j2"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The report's template environment: autoescaping on, undefined names an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("gradleak.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["bits"] = bits
    return env


def stylesheet() -> Markup:
    """The page's CSS (a file of the package, trusted: inlined as it is)."""
    return Markup((resources.files("gradleak.report") / "static" / "report.css").read_text())


def build_report(folder: Path) -> tuple[str, dict[str, bytes]]:
    """The HTML text and the PNG files to write beside it."""
    rows, spec, _ = read_results(folder)
    ctx = context(rows, spec, read_utilities(folder), folder.name, time.strftime("%Y-%m-%d %H:%M"))
    plot = privacy_utility_plot(ctx["points"])
    page = environment().get_template(TEMPLATE).render(
        **ctx, css=stylesheet(), plot=data_uri(plot) if plot else None, grids=image_grids(ctx["groups"]),
        tile=TILE, thresholds={"recognisable": RECOGNISABLE_SKILL, "partly": PARTLY_SKILL, "high_reid": HIGH_REID})
    return page, ({"privacy_utility.png": plot} if plot else {})


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (and the plot PNGs beside it); returns the HTML file's path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"experiment folder not found: {folder}")
    page, files = build_report(folder.resolve())
    target = Path(out) if out else folder / "report.html"
    for name, data in files.items():
        write_bytes(target.parent / name, data)
    write_text(target, page)
    return target


__all__ = ["build_report", "write_report", "environment", "stylesheet"]
