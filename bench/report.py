"""The benchmark's table: each figure beside its target and its ratio to the target.

A row is filled in by the section that measures it, or marked n/a (an endpoint the server
does not have yet), FAILED (requests failed: the run then exits non-zero) or VOID (the
load generator was above 80 % of its core, so the figure measures the generator). Nothing
here judges a run: `meets` is information, never an assertion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VOID_CPU = 0.80


@dataclass(slots=True)
class Row:
    what: str
    target: str  # as printed, e.g. ">= 1,000 jobs/s"
    figure: str = "not run"
    ratio: float | None = None  # figure / target, whichever way the target points
    meets: str = "-"
    notes: list[str] = field(default_factory=list)

    def measured(
        self, figure: str, value: float, target: float, higher_is_better: bool, strict: bool = True
    ) -> None:
        """`strict` says whether the bound of a lower-is-better target is excluded (< vs <=)."""
        self.figure, self.ratio = figure, value / target if target else None
        if higher_is_better:
            ok = value >= target
        else:
            ok = value < target if strict else value <= target
        if self.meets != "VOID":
            self.meets = "yes" if ok else "no"
        print(f"  {self.what}: {figure}  (target {self.target})", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"    {text}", flush=True)

    def void_if_busy(self, generator_cpu: float, what: str = "generator") -> None:
        """A generator near 100 % of its core caps the figure: say so next to it. There is
        no spare core for a second generator process (core 0 belongs to the server)."""
        if generator_cpu > VOID_CPU:
            self.meets = "VOID"
            self.note(
                f"VOID: {what} at {generator_cpu:.0%} of its core (only core 1 is left for "
                "load generators, so more generator processes cannot help)"
            )

    def unavailable(self, why: str) -> None:
        self.figure, self.meets = f"n/a ({why})", "n/a"
        print(f"  {self.what}: {self.figure}", flush=True)

    def failed(self, why: str) -> None:
        self.figure, self.meets = "FAILED", "FAILED"
        self.note(f"FAILED: {why}")


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    context: list[str] = field(default_factory=list)

    def row(self, what: str, target: str) -> Row:
        row = Row(what, target)
        self.rows.append(row)
        return row

    @property
    def failed(self) -> bool:
        return any(row.meets == "FAILED" for row in self.rows)

    def print(self) -> None:
        headers = ("what", "figure", "target", "ratio to target", "meets")
        table = [
            (r.what, r.figure, r.target, f"{r.ratio:.2f}" if r.ratio is not None else "-", r.meets)
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [headers, *table]) for i in range(len(headers))]
        widths[1] = min(widths[1], 44)
        print("\n" + "=" * 30 + " results " + "=" * 30)
        for line in self.context:
            print(line)
        print()
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        print("  ".join("-" * w for w in widths))
        for row, cells in zip(self.rows, table, strict=True):
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
            for text in row.notes:
                print(f"    {text}")
