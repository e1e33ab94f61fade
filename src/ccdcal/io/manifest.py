"""The manifest of a reduction (OUT/manifest.json): per output, a fingerprint of everything it
was made from, the hash of its bytes and its inputs; a rerun keeps outputs whose fingerprint is
unchanged. Also :func:`verify`, which checks an output folder against its manifest.

Files are identified by their XXH3-128 hash (:data:`HASH`), the checksum rsync (3.2 and later)
uses to tell whether a file changed. The manifest guards against accidents (a raw frame edited
or replaced, an output corrupted or modified), not against forgery, and a reduction hashes every
input and output once: XXH3 runs at ~15 GB/s on one core, SHA-256 at ~1.5 GB/s even with the
CPU's SHA instructions, which made hashing ~9 % of a whole night's CPU time. Manifests written
before (``"sha256"`` entries) are still verified with SHA-256.

Fingerprints are built from the dataclasses that decide an output (recipe, combine settings,
the options that change pixels), never from their descriptions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .frames import is_fits_name
from .guard import OUTPUT_FOLDERS, output_lock
from .hashing import HASH, file_hash, hash_rest
from .writer import write_text

_OLD_HASH = "sha256"    # manifests written before ccdcal took XXH3 (verified, never written)

def input_record(path: Path, hdu: int) -> dict[str, Any]:
    """What a fingerprint knows of one input file."""
    st = path.stat()
    return {"path": str(path), "hdu": hdu, "size": st.st_size, "mtime": st.st_mtime, HASH: file_hash(path)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def fingerprint(*parts: Any) -> str:
    """A short hash of ``parts`` (dataclasses by their fields, anything else by ``str``)."""
    return hashlib.sha256(json.dumps(_plain(parts), sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class OutputRecord:
    """What a task did with one output: made, kept (up to date) or skipped, and why."""

    output: str                               # relative to the output folder, or the input path when skipped
    kind: str
    fingerprint: str = ""
    inputs: tuple[dict[str, Any], ...] = ()
    reused: bool = False
    skipped: str | None = None                # the reason, when nothing was written
    datasum: str = ""                         # DATASUM of a master (its identity for the outputs built on it)
    hash: str = ""                            # of the output file (HASH), by the task that wrote it
    extra: dict[str, Any] = field(default_factory=dict)


class Manifest:
    """The outputs of this run and of the previous one (kept listed until redone)."""

    def __init__(self, out_dir: Path, *, force: bool = False):
        self.out_dir = out_dir
        self.outputs: dict[str, dict[str, Any]] = {}
        self.previous = {} if force else self._load()
        self._fixed: dict[str, tuple[Any, str]] = {}
        self._entries: dict[str, tuple[Any, str]] = {}   # each output's entry and its JSON text
        #: the DATASUM of each output this run wrote (in memory: what the run's report checks)
        self.datasums: dict[str, str] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        path = self.out_dir / "manifest.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("outputs", {})
        except (OSError, ValueError):
            return {}

    def previous_entry(self, rel: str) -> dict[str, Any] | None:
        return self.previous.get(rel)

    def record(self, record: OutputRecord) -> None:
        if record.skipped is not None:
            return
        if record.datasum and not record.reused:
            self.datasums[record.output] = record.datasum
        self.outputs[record.output] = {
            "fingerprint": record.fingerprint,
            HASH: record.hash or file_hash(self.out_dir / record.output),
            "inputs": list(record.inputs), "kind": record.kind, **({"reused": True} if record.reused else {}),
            **record.extra}

    def fix(self, parts: dict[str, Any]) -> None:
        """Parts of the body that stay the same objects for the rest of the run (the inputs, the
        plan): encoded once here, not at every :meth:`write` (1.2 MB of JSON for a night of 800
        lights took 0.28 s a write, and a run writes once per master)."""
        self._fixed = {key: (value, _encoded(value, 1)) for key, value in parts.items()}

    def write(self, body: dict[str, Any]) -> None:
        """Write manifest.json: ``body`` (plan, parameters, inputs...) plus the outputs.

        Outputs of the previous run that this one has not reached yet stay listed, so a run
        killed now still knows they are up to date. The text is what ``json.dumps(..., indent=1,
        default=str)`` gives; the parts given to :meth:`fix` (while ``body`` holds those very
        objects) and each output's entry are encoded once.
        """
        outputs = dict(sorted(self.outputs.items()))
        for rel, entry in self.previous.items():
            outputs.setdefault(rel, entry)
        members = []
        for key, value in {**body, "outputs": outputs}.items():
            known = self._fixed.get(key)
            if key == "outputs":
                text = self._outputs_text(outputs)
            elif known is not None and known[0] is value:
                text = known[1]
            else:
                text = _encoded(value, 1)
            members.append(f"{_key_text(key)}: {text}")
        write_text(self.out_dir / "manifest.json", "{\n " + ",\n ".join(members) + "\n}")

    def _outputs_text(self, outputs: dict[str, dict[str, Any]]) -> str:
        members = []
        for rel, entry in outputs.items():
            known = self._entries.get(rel)
            if known is None or known[0] is not entry:     # entries are never changed once made
                known = self._entries[rel] = (entry, _encoded(entry, 2))
            members.append(f"{_key_text(rel)}: {known[1]}")
        return "{\n  " + ",\n  ".join(members) + "\n }" if members else "{}"


def _key_text(key: Any) -> str:
    """A member's name as ``json.dumps`` writes it (a key that is not text as JSON names it)."""
    return json.dumps(key) if isinstance(key, str) else json.dumps({key: 0})[1:-4]


def _encoded(value: Any, depth: int) -> str:
    """``value``'s JSON text as it stands ``depth`` levels deep in a document dumped with indent 1
    (a JSON text has no raw newline but those of its layout)."""
    return json.dumps(value, indent=1, default=str).replace("\n", "\n" + " " * depth)


def up_to_date(out_dir: Path, rel: str, fingerprint_value: str, entry: dict[str, Any] | None) -> bool:
    """Whether ``rel`` exists with the content and fingerprint its manifest entry records."""
    path = out_dir / rel
    if not entry or entry.get("fingerprint") != fingerprint_value or not path.exists():
        return False
    return entry.get(HASH) == file_hash(path)


def same_bytes(path: Path, record: dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the bytes ``record`` (a manifest entry or input record)
    hashed: by :data:`HASH`, or by SHA-256 for a manifest written before ccdcal took XXH3."""
    if HASH in record:
        return file_hash(path) == record[HASH]
    if _OLD_HASH in record:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            hash_rest(fh, digest)
        return digest.hexdigest() == record[_OLD_HASH]
    return False


@dataclass
class VerifyResult:
    """What :func:`verify` found: outputs that check out, and problems (path, reason)."""

    ok: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)     # FITS files in OUT the manifest does not list


def verify(out_dir: str | os.PathLike) -> VerifyResult:
    """Check every output listed in OUT/manifest.json: present, same hash as recorded, and
    FITS CHECKSUM/DATASUM valid; outputs whose inputs changed since are reported as stale, and
    FITS files in the output folders that the manifest does not list are named. Holds the
    folder's lock shared, so a run writing it is never read half-way."""

    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        raise InputError(f"{out_dir}: no manifest.json here; is this a ccdcal reduce output folder?")
    with output_lock(out_dir, shared=True):
        return _verify(out_dir)


def _verify(out_dir: Path) -> VerifyResult:
    path = out_dir / "manifest.json"
    try:
        outputs = json.loads(path.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); rerun reduce to rewrite it") from exc
    result = VerifyResult()
    for rel, entry in sorted(outputs.items()):
        problem = _check_output(out_dir / rel, entry)
        if problem:
            result.problems.append((rel, problem))
            continue
        changed = []
        for record in entry.get("inputs", []):
            src = Path(record["path"])
            if not src.exists():
                changed.append(f"{src.name} is gone")
            elif not same_bytes(src, record):
                changed.append(f"{src.name} changed")
        if changed:
            result.stale.append((rel, "; ".join(changed)))
        result.ok.append(rel)
    listed = {Path(rel).as_posix() for rel in outputs}
    for folder in OUTPUT_FOLDERS:
        for found in sorted((out_dir / folder).glob("*")):
            rel = f"{folder}/{found.name}"
            if is_fits_name(found) and not found.name.startswith(".") and rel not in listed:
                result.unlisted.append(rel)
    return result


def _check_output(target: Path, entry: dict[str, Any]) -> str | None:
    import warnings

    from astropy.io import fits

    if not target.exists():
        return "missing"
    if not same_bytes(target, entry):
        return "content differs from the manifest (modified or corrupted)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(target, checksum=True) as hdul:
                for hdu in hdul:
                    _ = hdu.data
        except (OSError, ValueError) as exc:
            return f"unreadable FITS ({exc})"
    bad = [str(w.message) for w in caught if "checksum" in str(w.message).lower() or "datasum" in str(w.message).lower()]
    return f"CHECKSUM/DATASUM mismatch: {bad[0]}" if bad else None
