"""The classroom kit's integrity: the SHA-256 of every file, recorded when the kit is made and
checked on each machine before anything of it is installed. Standard library only, because
``tasks.py`` runs it before the kit's packages are installed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["HASHES_NAME", "KitError", "record_hashes", "verify_kit"]

HASHES_NAME = "kit-sha256.json"  # every file of the kit and its SHA-256, written when it is made


class KitError(RuntimeError):
    """A kit that cannot be made or used; the message names the file and what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _kit_files(kit: Path) -> list[Path]:
    return sorted(p for p in kit.rglob("*") if p.is_file() and p.name != HASHES_NAME and not p.name.endswith(".part"))


def record_hashes(kit: Path) -> Path:
    """Write the SHA-256 of every file of the kit into kit-sha256.json (after it is complete)."""
    hashes = {p.relative_to(kit).as_posix(): _sha256(p) for p in _kit_files(kit)}
    path = kit / HASHES_NAME
    path.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verify_kit(kit: Path) -> int:
    """Check every file of the kit against kit-sha256.json before anything of it is installed or
    run: a wheel replaced or added after the kit was made would otherwise run its code on every
    machine of the room. Returns the number of files checked."""
    path = kit / HASHES_NAME
    if not path.is_file():
        raise KitError(f"{kit} has no {HASHES_NAME}: it was made by an older version or by hand, so its files "
                       "cannot be checked. Make the kit again with python3 tasks.py classroom-kit DIR.")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KitError(f"{path} is damaged ({error}); make the kit again.") from None
    present = {p.relative_to(kit).as_posix(): p for p in _kit_files(kit)}
    added = sorted(set(present) - set(recorded))
    missing = sorted(set(recorded) - set(present))
    changed = sorted(name for name in set(present) & set(recorded) if _sha256(present[name]) != recorded[name])
    if added or changed:
        raise KitError(f"{kit} holds files that are not the ones it was made with: "
                       + "; ".join(f"{what}: {', '.join(names[:5])}" for what, names in
                                   (("changed", changed), ("added", added)) if names)
                       + ". Nothing was installed. Copy the kit again from the instructor's machine.")
    if missing:
        print(f"kit: {len(missing)} recorded file(s) are missing ({', '.join(missing[:3])}); the rest is checked.")
    return len(present)
