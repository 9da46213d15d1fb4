"""The live terminal view of a search (rich): trials running / done / pruned / failed, the best
HM so far with its base and novel accuracy, elapsed time. On a terminal it redraws in place; in a
log (no TTY) it prints one line per finished trial instead."""
from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gcs_tune.tune.results import TrialRecord, best_so_far
from gcs_tune.tune.trial import TERMINAL, TrialReport, TrialState

_NONE = TrialReport(hm=0.0, base_acc=0.0, novel_acc=0.0)  # shown for a trial that has not reported yet


def _fmt_params(params: dict, width: int = 60) -> str:
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return text if len(text) <= width else text[: width - 1] + "…"


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LiveView:
    """Owned by the driver callback: ``start`` in its setup, ``update`` on each Tune loop step
    (throttled), ``finished`` when a trial ends, ``stop`` at the end of the experiment."""

    def __init__(self, name: str, planned: int, console: Console | None = None, refresh_s: float = 0.5):
        self.name, self.planned, self.refresh_s = name, planned, refresh_s
        self.console = console or Console(stderr=True)
        self.live: Live | None = None
        self.start_time = time.time()
        self._last = 0.0

    def start(self) -> None:
        self.start_time = time.time()
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, records: list[TrialRecord], force: bool = False) -> None:
        now = time.time()
        if self.live is None or (not force and now - self._last < self.refresh_s):
            return
        self._last = now
        self.live.update(self.render(records))

    def finished(self, rec: TrialRecord) -> None:
        """One line per finished trial when there is no live display (logs, CI)."""
        if self.live is not None:
            return
        m = rec.report or _NONE
        what = (f"HM {m.hm:5.1f} (base {m.base_acc:5.1f} / novel {m.novel_acc:5.1f})"
                f" {'feasible' if m.feasible else 'below floor'}") if rec.state != TrialState.FAILED \
            else f"{rec.error.strip().splitlines()[-1][:80] if rec.error.strip() else 'error'} (output: {rec.log})"
        self.console.print(f"[{_elapsed(time.time() - self.start_time)}] trial {rec.number:>3} {rec.state:<8} "
                           f"epoch {rec.epoch}/{rec.epochs}  {what}  {_fmt_params(rec.params)}", highlight=False,
                           soft_wrap=True, markup=False)

    def stop(self, records: list[TrialRecord]) -> None:
        if self.live is not None:
            self.live.update(self.render(records))
            self.live.stop()
            self.live = None

    def render(self, records: list[TrialRecord]) -> Group:
        counts = {s: sum(r.state == s for r in records) for s in TrialState}
        done = sum(counts[s] for s in TERMINAL)
        head = Text.assemble((f"study {self.name}", "bold"), f"   elapsed {_elapsed(time.time() - self.start_time)}   ",
                             f"{done}/{self.planned} done: " + ", ".join(f"{counts[s]} {s}" for s in TERMINAL)
                             + f"; {counts[TrialState.RUNNING]} running")
        best = best_so_far(records)
        if best is None:
            lead = Text("best: none yet")
        else:
            m = best.report
            tag = "feasible" if m.feasible else "NONE FEASIBLE YET, least violation"
            lead = Text(f"best HM {m.hm:.2f} (base {m.base_acc:.2f}, novel "
                        f"{m.novel_acc:.2f}) trial {best.number} [{tag}]  {_fmt_params(best.params, 80)}",
                        style="green")
        table = Table(box=None, pad_edge=False, show_edge=False)
        for col in ("trial", "state", "epoch", "HM", "base", "novel", "params"):
            table.add_column(col, justify="left" if col in ("state", "params") else "right")
        shown = [r for r in records if r.state == TrialState.RUNNING] + \
            sorted((r for r in records if r.state != TrialState.RUNNING), key=lambda r: -r.ended_at)[:5]
        for r in shown:
            m = r.report or _NONE
            table.add_row(str(r.number), r.state, f"{r.epoch}/{r.epochs}", f"{m.hm:.1f}",
                          f"{m.base_acc:.1f}", f"{m.novel_acc:.1f}", _fmt_params(r.params))
        return Group(head, lead, table)
