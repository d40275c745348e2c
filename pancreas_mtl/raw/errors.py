"""Errors about input data: each names the case, the file and what was expected versus found."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """One problem with one file (or one case)."""

    def __init__(self, path: str | Path | None, message: str, case_id: str | None = None):
        self.path = Path(path) if path is not None else None
        self.message = message
        self.case_id = case_id
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.case_id:
            where.append(f"case {self.case_id}")
        if self.path is not None:
            where.append(str(self.path))
        return f"{': '.join(where)}: {self.message}" if where else self.message

    def for_case(self, case_id: str) -> "DataError":
        """The same error, now naming the case it belongs to."""
        return DataError(self.path, self.message, case_id=case_id)


@dataclass(frozen=True)
class Problem:
    """One finding of a dataset check."""

    case_id: str | None
    path: Path | None
    message: str

    def __str__(self) -> str:
        return str(DataError(self.path, self.message, self.case_id))

    @classmethod
    def from_error(cls, error: DataError) -> "Problem":
        return cls(error.case_id, error.path, error.message)


class DatasetError(ValueError):
    """Every problem found in a dataset, reported together."""

    def __init__(self, problems: list[Problem], root: str | Path | None = None):
        self.problems = list(problems)
        self.root = root
        header = f"{len(self.problems)} problem(s) in dataset" + (f" {root}" if root else "")
        super().__init__(header + ":\n" + "\n".join(f"  - {problem}" for problem in self.problems))
