"""``unconfuse atlas``: the failure atlas, every pair with its two images and each run's answers.

Writes one self-contained ``index.html`` (inline CSS and JS, images copied into ``images/``, nothing
fetched) and ``atlas.json`` (the same statuses and counts, for programs). Each run is compared with a
baseline, pair by pair, on set correctness (both images right):

- ``right``: the run and the baseline both get the pair right;
- ``fixed``: the run gets it right, the baseline did not;
- ``broken``: the baseline got it right, the run does not;
- ``still confused``: neither gets it right.

Runs are read through ``compare``'s loader (same benchmark by fingerprint, same pairs in every run).
Cards are sorted so that pairs fixed or broken by some run come first, then pairs some run still gets
wrong, then pairs every run gets right; the benchmark's order within each group.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unconfuse.eval.benchmarks import Benchmark
from unconfuse.eval.folders import owned_folder
from unconfuse.eval.images import is_dicom, load_image
from unconfuse.eval.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from unconfuse.eval.runs import RunFormatError, read_kind
from unconfuse.eval.scorer import category_order, outcomes
from unconfuse.eval.tools.compare import RunEntry, load_scored_runs
from unconfuse.eval.tracking import start_wandb_run

STATUSES = ("fixed", "broken", "still confused", "right")
CHANGED = ("fixed", "broken")
WEB_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}  # browsers show these as they are


class AtlasError(ValueError):
    """Inputs the atlas cannot be made of; the message names the one at fault."""


def pair_status(run_right: bool, baseline_right: bool) -> str:
    """A run's status on one pair against the baseline (set correctness: both images right)."""
    if run_right:
        return "right" if baseline_right else "fixed"
    return "broken" if baseline_right else "still confused"


@dataclass
class Atlas:
    """What the page shows: the baseline, the runs, and one card per pair in page order."""

    bench: Benchmark
    baseline: RunEntry
    runs: list[RunEntry]
    baseline_choice: str  # how the baseline was chosen, said on the page
    cards: list[dict[str, Any]]  # pair, categories, statuses (one per run), baseline_right
    images: dict[str, tuple[Path, str]]  # image reference -> (source file, file name under images/)
    counts: list[dict[str, int]] = field(default_factory=list)  # per run: status -> pairs

    @property
    def baseline_is_run(self) -> bool:
        """The baseline is one of the runs (a single scored folder): no separate baseline row."""
        return any(r.path.resolve() == self.baseline.path.resolve() for r in self.runs)

    @property
    def answer_rows(self) -> list[tuple[RunEntry, bool]]:
        """(entry, is the baseline row) for every row of answers on a card."""
        return ([] if self.baseline_is_run else [(self.baseline, True)]) + [(r, False) for r in self.runs]


def _directory(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise AtlasError(f"{path}: no such directory")
    return path


def _choose_baseline(inputs: list[Path], baseline: Path | None) -> tuple[Path, list[Path], str]:
    """(baseline, runs, how it was chosen). Without ``baseline``: a single run directory is compared with
    its own ``base/`` (the test pairs before training); otherwise the first directory is the baseline of
    the others, and a single scored folder is its own (every pair right or still confused)."""
    if baseline is not None:
        return baseline, inputs, f"--baseline {baseline}"
    first = inputs[0]
    try:
        kind = read_kind(first)
    except RunFormatError as exc:
        raise AtlasError(str(exc)) from exc
    if len(inputs) == 1 and kind in ("run", "cv") and (first / "base" / "results.json").is_file():
        return first / "base", inputs, f"{first / 'base'}: the run's test pairs before training"
    if len(inputs) == 1:
        return first, inputs, f"{first} itself (no other run given)"
    return first, inputs[1:], f"{first}: the first directory given"


def _unique_labels(entries: list[RunEntry]) -> None:
    seen: dict[str, int] = {}
    for entry in entries:
        seen[entry.label] = seen.get(entry.label, 0) + 1
    for entry in entries:
        if seen[entry.label] > 1:
            entry.label = f"{entry.label} ({entry.path.parent.name}/{entry.path.name})"


def _shows_in_browser(src: Path) -> bool:
    return src.suffix.lower() in WEB_IMAGE_SUFFIXES and not is_dicom(src)


def _image_names(bench: Benchmark) -> dict[str, tuple[Path, str]]:
    """Every image under a name made of its content hash (same image once; no clashes between folders);
    what a browser cannot show (DICOM, TIFF) becomes PNG."""
    names = {}
    for ref in bench.unique_images():
        src = bench.resolve_image(ref)
        if not src.is_file():
            raise AtlasError(f"image {ref} of {bench.name} not found (looked for {src})")
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        names[ref] = (src, f"{digest}{src.suffix.lower() if _shows_in_browser(src) else '.png'}")
    return names


def build_atlas(inputs: list[str | Path], baseline: str | Path | None = None, labels: list[str] | None = None,
                benchmark: str | None = None) -> Atlas:
    """Read the runs and the baseline, and give every pair its status per run, in page order."""
    if not inputs:
        raise AtlasError("give at least one run or eval directory")
    paths = [_directory(p) for p in inputs]
    if labels is not None and len(labels) != len(paths):
        raise AtlasError(f"{len(labels)} label(s) for {len(paths)} directories; give one per directory, in order")
    base_path, run_paths, choice = _choose_baseline(paths, _directory(baseline) if baseline is not None else None)
    bench, base, runs = load_scored_runs(run_paths, base_path, benchmark)
    if labels is not None:
        given = {p.resolve(): label for p, label in zip(paths, labels)}
        for entry in [base, *runs]:
            entry.label = given.get(entry.path.resolve(), entry.label)
    _unique_labels([base, *(r for r in runs if r.path.resolve() != base.path.resolve())])

    base_right = outcomes(bench.pairs, base.answers).set_correct
    runs_right = [outcomes(bench.pairs, r.answers).set_correct for r in runs]
    cards = []
    for i, pair in enumerate(bench.pairs):
        statuses = [pair_status(bool(right[i]), bool(base_right[i])) for right in runs_right]
        changed = sum(s in CHANGED for s in statuses)
        group = 0 if changed else 1 if "still confused" in statuses else 2
        cards.append({"pair": pair, "categories": category_order([pair]), "statuses": statuses,
                      "baseline_right": bool(base_right[i]), "order": (group, -changed, i)})
    cards.sort(key=lambda c: c["order"])
    counts = [{s: sum(c["statuses"][k] == s for c in cards) for s in STATUSES} for k in range(len(runs))]
    return Atlas(bench, base, runs, choice, cards, _image_names(bench), counts)


def write_atlas(inputs: list[str | Path], out: str | Path, baseline: str | Path | None = None,
                labels: list[str] | None = None, *, benchmark: str | None = None, force: bool = False,
                wandb: bool = False) -> Path:
    """Write ``out/index.html``, ``out/images/`` and ``out/atlas.json``; with ``wandb``, also log the
    atlas as a W&B table of images (online or offline as ``WANDB_MODE`` says). Returns the page's path."""
    out = Path(out)
    atlas = build_atlas(inputs, baseline, labels, benchmark)
    fingerprint = {"command": "atlas", "baseline": str(atlas.baseline.path.resolve()),
                   "runs": [str(r.path.resolve()) for r in atlas.runs], "data": atlas.bench.fingerprint()}
    with owned_folder(out, fingerprint, force=force, what="atlas"):
        _copy_images(atlas, out / "images")
        atomic_write_text(out / "index.html", render_html(atlas))
        summary = atlas_summary_data(atlas)
        summary["wandb"] = _log_wandb(atlas, out) if wandb else None
        atomic_write_json(out / "atlas.json", summary)
    return out / "index.html"


def _copy_images(atlas: Atlas, folder: Path) -> None:
    for ref, (src, name) in atlas.images.items():
        target = folder / name
        if target.exists():  # named by content: already the same image
            continue
        if not _shows_in_browser(src):
            try:
                image = load_image(src)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's fault
                raise AtlasError(f"image {ref} ({src}) cannot be read: {exc}") from exc
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(target, buffer.getvalue())
        else:
            atomic_write_bytes(target, src.read_bytes())


def atlas_summary_data(atlas: Atlas) -> dict[str, Any]:
    """``atlas.json``: the counts per run and every pair's statuses, in page order."""
    return {
        "benchmark": atlas.bench.name, "n_pairs": len(atlas.bench.pairs),
        "baseline": {"label": atlas.baseline.label, "path": str(atlas.baseline.path), "choice": atlas.baseline_choice,
                     "set_accuracy": atlas.baseline.results["set_accuracy"]},
        "runs": [{"label": r.label, "path": str(r.path), "set_accuracy": r.results["set_accuracy"], "counts": counts}
                 for r, counts in zip(atlas.runs, atlas.counts)],
        "changed_pairs": sum(any(s in CHANGED for s in c["statuses"]) for c in atlas.cards),
        "pairs": [{"id": c["pair"].id, "categories": c["categories"], "baseline_right": c["baseline_right"],
                   "statuses": dict(zip([r.label for r in atlas.runs], c["statuses"]))} for c in atlas.cards],
    }


def atlas_summary(summary: dict[str, Any], index: Path) -> str:
    """What the command prints: the counts per run and where the page is."""
    lines = [f"{summary['n_pairs']} pairs of {summary['benchmark']}; baseline {summary['baseline']['label']} "
             f"({summary['baseline']['choice']})",
             f"{'run':<44} " + " ".join(f"{s:>15}" for s in STATUSES)]
    for run in summary["runs"]:
        lines.append(f"{run['label'][:44]:<44} " + " ".join(f"{run['counts'][s]:>15}" for s in STATUSES))
    wb = summary.get("wandb")
    if wb:
        lines.append(f"logged to W&B: {wb['url']}" if wb["url"] else
                     f"W&B offline run in {wb['dir']} (upload it with `wandb sync {wb['dir']}`)")
    lines.append(f"wrote {index} (open it in a browser; it needs nothing outside {index.parent})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The page


def _answer(pair, answer: str | None) -> str:
    if answer is None:
        return "no valid answer"
    return f"{answer} ({pair.option_a if answer == 'A' else pair.option_b})"


def _css_class(status: str) -> str:
    return status.replace(" ", "-")


def _card(atlas: Atlas, card: dict[str, Any]) -> str:
    pair, esc = card["pair"], html.escape
    figures = []
    for side in (1, 2):
        name = atlas.images[pair.image(side)][1]
        figures.append(
            f'<figure><img src="images/{esc(name)}" alt="pair {esc(pair.id)} image {side}" loading="eager">'
            f'<figcaption>image {side}: right answer <b>{esc(_answer(pair, pair.answer(side)))}</b>'
            f'{" · " + esc(", ".join(pair.categories(side))) if pair.categories(side) else ""}</figcaption></figure>')
    rows = []
    statuses = iter(card["statuses"])
    for entry, is_baseline in atlas.answer_rows:
        cells = []
        for side in (1, 2):
            answer = entry.answers[(pair.id, side)]
            mark, cls = ("✓", "ok") if answer == pair.answer(side) else ("✗", "wrong")
            cells.append(f'<td class="{cls}">{mark} {esc(_answer(pair, answer))}</td>')
        if is_baseline:
            badge = f'<span class="badge base">baseline {"✓" if card["baseline_right"] else "✗"}</span>'
        else:
            status = next(statuses)
            badge = f'<span class="badge {_css_class(status)}">{status}</span>'
        rows.append(f'<tr><th scope="row">{esc(entry.label)}</th>{"".join(cells)}<td>{badge}</td></tr>')
    badges = "".join(f'<span class="badge {_css_class(s)}" title="{esc(r.label)}">{s}</span>'
                     for r, s in zip(atlas.runs, card["statuses"]) if s in CHANGED)
    data = (f'data-categories="{esc(json.dumps(card["categories"]))}" '
            f'data-statuses="{esc(json.dumps(card["statuses"]))}"')
    return (f'<article class="card" {data}>'
            f'<header><span class="pid">{esc(pair.id)}</span> <span class="cats">{esc(" · ".join(card["categories"]))}'
            f'</span> {badges}</header>'
            f'<p class="question">{esc(pair.question)}</p>'
            f'<p class="options">A: {esc(pair.option_a)} &nbsp;·&nbsp; B: {esc(pair.option_b)}</p>'
            f'<div class="sides">{"".join(figures)}</div>'
            f'<table class="answers"><thead><tr><th>run</th><th>image 1</th><th>image 2</th><th>status</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></article>')


def render_html(atlas: Atlas) -> str:
    """The whole page: counts, filters, cards; inline CSS and JS, images referenced as images/<name>."""
    esc = html.escape
    bench, base = atlas.bench, atlas.baseline
    categories = category_order(bench.pairs)
    per_category = {c: sum(c in card["categories"] for card in atlas.cards) for c in categories}
    head = "".join(f"<th>{s}</th>" for s in STATUSES)
    count_rows = "".join(
        f'<tr><th scope="row">{esc(r.label)}</th><td>{r.results["set_accuracy"]:.1f}</td>'
        + "".join(f'<td class="count {_css_class(s)}" data-run="{k}" data-status="{s}">{counts[s]}</td>' for s in STATUSES)
        + "</tr>" for k, (r, counts) in enumerate(zip(atlas.runs, atlas.counts)))
    changed = sum(any(s in CHANGED for s in c["statuses"]) for c in atlas.cards)
    category_options = "".join(f'<option value="{esc(c)}">{esc(c)} ({per_category[c]})</option>' for c in categories)
    status_options = "".join(f'<option value="{s}">{s}</option>' for s in STATUSES)
    run_options = "".join(f'<option value="{k}">{esc(r.label)}</option>' for k, r in enumerate(atlas.runs))
    cards = "\n".join(_card(atlas, card) for card in atlas.cards)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Failure atlas: {esc(bench.name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Failure atlas: {esc(bench.name)}</h1>
<p>{len(bench.pairs)} pairs. Baseline: <b>{esc(base.label)}</b> (set accuracy {base.results["set_accuracy"]:.1f};
{esc(atlas.baseline_choice)}). Per run and pair, against the baseline, on set correctness (both images right):
<span class="badge fixed">fixed</span> the run gets the pair right, the baseline did not;
<span class="badge broken">broken</span> the baseline got it right, the run does not;
<span class="badge still-confused">still confused</span> neither;
<span class="badge right">right</span> both. {changed} pair(s) fixed or broken by some run come first, then pairs
some run still gets wrong, then pairs every run gets right.</p>
<p>Pairs per status (click a count to see those pairs):</p>
<table class="counts"><thead><tr><th>run</th><th>set accuracy</th>{head}</tr></thead><tbody>{count_rows}</tbody></table>
<form class="filters" onsubmit="return false">
<label>category <select id="category"><option value="">all ({len(bench.pairs)})</option>{category_options}</select></label>
<label>status <select id="status"><option value="">any</option>{status_options}</select></label>
<label>of <select id="run"><option value="any">any run</option>{run_options}</select></label>
<span>showing <b id="shown">{len(atlas.cards)}</b> of {len(atlas.cards)} pairs</span>
</form>
<main id="cards">
{cards}
</main>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1f2328;background:#f6f8fa}
h1{font-size:1.5em;margin:0 0 .4em}
table{border-collapse:collapse}
.counts td,.counts th{border:1px solid #d0d7de;padding:.25em .6em;text-align:right;background:#fff}
.counts th[scope=row]{text-align:left}
.counts td.count{cursor:pointer}
.filters{margin:1em 0;display:flex;gap:1.5em;align-items:center;flex-wrap:wrap}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1em}
[hidden]{display:none!important}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.8em}
.card header{display:flex;gap:.5em;align-items:center;flex-wrap:wrap}
.pid{font-weight:600;font-family:ui-monospace,monospace}
.cats{color:#57606a}
.question{font-weight:600;margin:.5em 0 .2em}
.options{margin:0 0 .5em;color:#57606a}
.sides{display:grid;grid-template-columns:1fr 1fr;gap:.6em}
figure{margin:0}
figure img{width:100%;height:240px;object-fit:contain;background:#000;border-radius:4px;display:block}
figcaption{font-size:.9em;margin-top:.2em}
.answers{width:100%;margin-top:.6em;font-size:.92em}
.answers th,.answers td{border-top:1px solid #d8dee4;padding:.2em .4em;text-align:left;vertical-align:top}
.answers th[scope=row]{font-weight:500;max-width:14em;overflow-wrap:anywhere}
td.ok{color:#1a7f37}
td.wrong{color:#cf222e}
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.85em;font-weight:600;color:#fff;white-space:nowrap}
.badge.fixed{background:#1a7f37}
.badge.broken{background:#cf222e}
.badge.still-confused{background:#bf8700}
.badge.right{background:#57606a}
.badge.base{background:#8250df}
td.count.fixed{color:#1a7f37;font-weight:600}
td.count.broken{color:#cf222e;font-weight:600}
"""

_JS = """
(function () {
  var category = document.getElementById('category'), status = document.getElementById('status'),
      run = document.getElementById('run'), shown = document.getElementById('shown'),
      cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  function apply() {
    var n = 0;
    cards.forEach(function (card) {
      var categories = JSON.parse(card.dataset.categories), statuses = JSON.parse(card.dataset.statuses);
      var okCategory = !category.value || categories.indexOf(category.value) >= 0;
      var okStatus = !status.value || (run.value === 'any' ? statuses.indexOf(status.value) >= 0
                                                           : statuses[+run.value] === status.value);
      card.hidden = !(okCategory && okStatus);
      if (!card.hidden) n++;
    });
    shown.textContent = n;
  }
  [category, status, run].forEach(function (el) { el.addEventListener('change', apply); });
  // a count in the table filters to those pairs of that run
  document.querySelectorAll('td.count').forEach(function (td) {
    td.addEventListener('click', function () {
      run.value = td.dataset.run; status.value = td.dataset.status; apply();
    });
  });
  apply();
})();
"""


# ---------------------------------------------------------------------------------------------
# W&B


def atlas_table(atlas: Atlas, out: str | Path):
    """The atlas as a ``wandb.Table``: one row per pair in page order, the two images as ``wandb.Image``s
    (the copies in ``out/images``), the right answers, every row's answers and every run's status."""
    import wandb

    out = Path(out)
    columns = ["pair", "categories", "question", "option_a", "option_b", "image_1", "image_2", "answer_1", "answer_2"]
    for entry, _ in atlas.answer_rows:
        columns += [f"{entry.label}: answer_1", f"{entry.label}: answer_2"]
    columns += [f"{r.label}: status" for r in atlas.runs]
    data = []
    for card in atlas.cards:
        pair = card["pair"]
        row = [pair.id, ", ".join(card["categories"]), pair.question, pair.option_a, pair.option_b,
               *(wandb.Image(str(out / "images" / atlas.images[pair.image(side)][1]), caption=f"{pair.id} image {side}")
                 for side in (1, 2)),
               pair.answer_1, pair.answer_2]
        for entry, _ in atlas.answer_rows:
            row += [entry.answers[(pair.id, 1)], entry.answers[(pair.id, 2)]]
        data.append(row + list(card["statuses"]))
    return wandb.Table(columns=columns, data=data)


def _log_wandb(atlas: Atlas, out: Path) -> dict[str, Any]:
    run = start_wandb_run(out.name, str(out), job_type="atlas")
    run.log({"atlas": atlas_table(atlas, out)})
    info = {"url": run.url if not run.offline else None, "dir": str(Path(run.dir).parent)}
    run.finish()
    return info
