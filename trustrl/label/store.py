"""The judgement log: one JSON line per action, appended, flushed and fsynced before the
server answers, so stopping the server at any moment loses nothing that was acknowledged.

Rows (see :mod:`trustrl.rankings`): ``{"id", "item", "annotator", "action": "rank" | "skip" |
"undo", "time", ...}``; a rank row also holds ``prompt``, ``responses``, ``ranks`` and
``note``; an undo row ``undoes``. On start the log is replayed, so the app continues where it
left off: an annotator's next item is the first one they have neither ranked nor skipped that
still needs rankings (``per_item``: how many annotators should rank each item).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from trustrl.rankings import check_ranks, current_judgements

__all__ = ["JudgementStore"]


class JudgementStore:
    """The log file and the state replayed from it; every method is thread-safe."""

    def __init__(self, path: str | Path, per_item: int = 1):
        if per_item < 1:
            raise ValueError(f"per_item must be >= 1, got {per_item}")
        self.path = Path(path)
        self.per_item = per_item
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        self._rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        # only the very last line can be cut short by a crash mid-write
                        # (every acknowledged row was fsynced whole); anything else is damage
                        raise ValueError(f"{self.path} line {line_no}: not JSON ({err}); the judgement log is "
                                         "damaged, fix or move it") from err
        self._in_force = current_judgements(self._rows, where=str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- reading

    def judgements(self) -> list[dict[str, Any]]:
        """The rank and skip rows in force (undone ones left out), in log order."""
        with self._lock:
            return [dict(r) for r in self._in_force]

    def _done_by(self, annotator: str) -> set[str]:
        return {str(r["item"]) for r in self._in_force if r.get("annotator") == annotator}

    def _rank_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._in_force:
            if r.get("action", "rank") == "rank":
                counts[str(r["item"])] = counts.get(str(r["item"]), 0) + 1
        return counts

    def next_item(self, annotator: str, item_ids: list[str]) -> int | None:
        """Index (in ``item_ids``) of the annotator's next item, or None when they are done."""
        with self._lock:
            done, counts = self._done_by(annotator), self._rank_counts()
        for index, item in enumerate(item_ids):
            if item not in done and counts.get(item, 0) < self.per_item:
                return index
        return None

    def progress(self, annotator: str, item_ids: list[str]) -> dict[str, int]:
        """``{"ranked", "skipped"}`` by this annotator, ``"rankings"`` by everyone, ``"items"``,
        ``"needed"`` (items x per_item) and ``"complete"`` (items with per_item rankings)."""
        with self._lock:
            mine = [r for r in self._in_force if r.get("annotator") == annotator]
            counts = self._rank_counts()
        return {
            "ranked": sum(r.get("action", "rank") == "rank" for r in mine),
            "skipped": sum(r.get("action") == "skip" for r in mine),
            "rankings": sum(counts.values()), "items": len(item_ids), "needed": len(item_ids) * self.per_item,
            "complete": sum(counts.get(i, 0) >= self.per_item for i in item_ids),
        }

    # ----------------------------------------------------------------- writing

    def _append(self, row: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._rows.append(row)
        return row

    @staticmethod
    def _base(item: str, annotator: str, action: str) -> dict[str, Any]:
        if not annotator.strip():
            raise ValueError("an annotator name is required")
        return {"id": uuid.uuid4().hex, "item": item, "annotator": annotator.strip(), "action": action,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def rank(self, item: str, annotator: str, prompt: Any, responses: list[str], ranks: list[int],
             note: str = "", **extra: Any) -> dict[str, Any]:
        """Append a ranking (validated) and return its row."""
        ranks = check_ranks(ranks, len(responses), f"ranking of item {item!r}")
        row = {**self._base(item, annotator, "rank"), "prompt": prompt, "responses": list(responses),
               "ranks": ranks, "note": str(note or ""), **extra}
        with self._lock:
            self._append(row)
            self._in_force.append(row)
        return row

    def skip(self, item: str, annotator: str, note: str = "") -> dict[str, Any]:
        row = {**self._base(item, annotator, "skip"), "note": str(note or "")}
        with self._lock:
            self._append(row)
            self._in_force.append(row)
        return row

    def undo(self, annotator: str) -> dict[str, Any] | None:
        """Undo the annotator's latest rank or skip still in force; returns that row (or None
        when there is nothing to undo)."""
        with self._lock:
            mine = [r for r in self._in_force if r.get("annotator") == annotator.strip()]
            if not mine:
                return None
            target = mine[-1]
            self._append({**self._base(str(target["item"]), annotator, "undo"), "undoes": target["id"]})
            self._in_force.remove(target)
        return target
