"""Output folders that are never silently overwritten or mixed.

Each command that writes a folder (``prepare``, ``train``, ``eval``, ``align``) records its settings
in ``settings.json`` there before writing anything else. Run again on the same folder, it compares:
other settings are refused, listing the differences, unless ``--overwrite`` (which removes the
command's earlier outputs first); the same settings continue where the command can continue (prepare
skips finished shards) and otherwise need ``--resume`` (train, align) or ``--overwrite`` (eval).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dina_lrm.config import settings_differences

SETTINGS_NAME = "settings.json"


class OutputExists(ValueError):
    """The output folder holds earlier results this run would overwrite or mix with."""


def claim_output(out: Path, command: str, settings: dict, outputs: list[str], *, overwrite: bool = False,
                 continues: bool = False, resume: bool = False) -> None:
    """Make ``out`` this run's folder, or raise :class:`OutputExists` saying why not.

    ``outputs``: glob patterns of what ``command`` writes in ``out`` (what ``--overwrite`` removes, and
    what marks a folder as used when it has no ``settings.json``). ``continues``: the command picks up
    a run with the same settings by itself. ``resume``: this run asked to resume the earlier one."""
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    if not resume:  # a resumed run is checked against its checkpoint by the trainer
        _check_earlier(out, command, settings, outputs, overwrite, continues)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_NAME).write_text(json.dumps({"command": command, "settings": settings}, indent=1))


def _check_earlier(out: Path, command: str, settings: dict, outputs: list[str], overwrite: bool, continues: bool) -> None:
    earlier = _earlier_outputs(out, outputs)
    if overwrite:  # removes only what this command writes
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if not earlier:
        return
    recorded = _recorded(out, command)
    if recorded is None:
        raise OutputExists(f"{out} holds earlier {command} outputs ({earlier[0].name}, ...) without a {SETTINGS_NAME}; "
                           "pass --overwrite to replace them or choose another output folder")
    changes = settings_differences(recorded, settings)
    if changes:
        raise OutputExists(f"{out} holds a {command} run with other settings ({'; '.join(changes)}); "
                           "pass --overwrite to replace it or choose another output folder")
    if not continues:
        hint = "--resume latest to continue it, or --overwrite" if command in ("train", "align") else "--overwrite"
        raise OutputExists(f"{out} already holds {command} results with these settings; pass {hint} to replace them")


def _earlier_outputs(out: Path, patterns: list[str]) -> list[Path]:
    """What ``command`` wrote into ``out`` before (its settings file alone does not count)."""
    if not out.is_dir():
        return []
    return sorted({path for pattern in patterns for path in out.glob(pattern)})


def _recorded(out: Path, command: str) -> dict | None:
    path = out / SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise OutputExists(f"{path} is damaged ({err}); pass --overwrite to start the folder over") from None
    if record.get("command") != command:
        raise OutputExists(f"{out} holds the outputs of `dina-lrm {record.get('command')}`, not {command}; choose another folder")
    return record["settings"]
