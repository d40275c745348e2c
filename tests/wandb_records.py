"""Reading an offline W&B run back: its ``run-<id>.wandb`` file (LevelDB log blocks of ``wandb.proto`` Record
messages; wandb 0.31 ships no reader of its own) and its ``files/`` folder (media, tables)."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B"
HEADER_SIZE = 7          # ":W&B", magic (2 bytes), version (1 byte)
BLOCK_SIZE = 32 * 1024   # records never straddle a block's last 6 bytes
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: Path):
    """Every complete Record of a .wandb file, in order (a record still being written ends the list)."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_SIZE:
        return
    assert data[:4] == HEADER, f"{path} is not a W&B run file"
    position, pending = HEADER_SIZE, b""
    while position + RECORD_HEADER.size <= len(data):
        left = BLOCK_SIZE - position % BLOCK_SIZE
        if left < RECORD_HEADER.size:
            position += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        position += RECORD_HEADER.size
        if kind == 0 and length == 0:
            continue
        if position + length > len(data):
            return
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _json(value_json: str):
    return json.loads(value_json) if value_json else None


@dataclass
class OfflineRun:
    """What an offline run holds, as plain values."""

    folder: Path
    id: str = ""
    job_type: str = ""
    group: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)   # one dict per logged step, top-level keys
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)  # {type, name, aliases, files, metadata}
    charts: dict = field(default_factory=dict)           # {key: vega spec id} of custom charts (plots)

    @property
    def history_keys(self) -> set[str]:
        return {key for step in self.history for key in step}

    def files(self, pattern: str) -> list[Path]:
        return sorted((self.folder / "files").glob(pattern))

    def table(self, key: str) -> dict:
        """The last logged table under ``key``: {"columns": [...], "data": [[...], ...]}."""
        value = [step[key] for step in self.history if key in step][-1]
        return json.loads((self.folder / "files" / value["path"]).read_text())


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run's file. wandb-core writes the file in the background and may still be
    flushing it when ``run.finish()`` returns: read it again until its ``exit`` record is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def read_run(folder: Path) -> OfflineRun:
    """The offline run in ``folder`` (``.../wandb/offline-run-<date>-<id>``)."""
    [path] = list(Path(folder).glob("run-*.wandb"))
    run = OfflineRun(Path(folder))
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.job_type, run.group = record.run.run_id, record.run.job_type, record.run.run_group
            run.name = record.run.display_name
            run.config.update({item.key: _json(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            for item in record.config.update:
                if item.key:
                    run.config[item.key] = _json(item.value_json)
                elif list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                    spec = _json(item.value_json)
                    run.charts[item.nested_key[2]] = spec["panel_config"]["panelDefId"]
        elif kind == "history":
            step: dict = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                if len(keys) == 1:
                    step[keys[0]] = _json(item.value_json)
                else:
                    step.setdefault(keys[0], {})[keys[1]] = _json(item.value_json)
            run.history.append(step)
        elif kind == "summary":
            for item in record.summary.update:
                keys = list(item.nested_key) or [item.key]
                if len(keys) == 1:
                    run.summary[keys[0]] = _json(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append({"type": artifact.type, "name": artifact.name, "aliases": list(artifact.aliases),
                                  "files": [entry.path for entry in artifact.manifest.contents],
                                  "metadata": _json(artifact.metadata) or {}})
    return run


def offline_runs(directory: Path) -> list[OfflineRun]:
    """Every offline run under ``directory``/wandb, oldest first."""
    return [read_run(folder) for folder in sorted((Path(directory) / "wandb").glob("offline-run-*"))]
