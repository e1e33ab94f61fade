"""What `reduce` makes durable, and when: every output file is fsynced before it is renamed into
place; the lights' folder is fsynced once, after its last light and before the manifest lists
them (not once per light); masters and the manifest keep their folder fsync each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ccdcal.io.writer as writer
from ccdcal import ReduceOptions, reduce
from nightgen import make_night


def test_lights_are_durable_before_the_manifest_lists_them(tmp_path, monkeypatch):
    make_night(tmp_path / "raw", seed=3, size=64)
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(Path(dst).resolve())))
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "replace", replace)
    result = reduce([tmp_path / "raw"], out, options=ReduceOptions(report=False))
    assert result.lights

    out = out.resolve()
    lights = {str(out / rel) for rel in result.lights}
    folders = {str(Path(p).parent) for p in lights}
    renamed = [i for i, (kind, p) in enumerate(events) if kind == "rename" and p in lights]
    assert len(renamed) == len(lights)
    # each light's bytes were fsynced (under its temporary name) before its rename
    for i in renamed:
        target = Path(events[i][1])
        assert any(kind == "fsync" and Path(p).parent == target.parent and target.name in Path(p).name
                   for kind, p in events[:i])
    # its folder: fsynced once after the last light, and before the manifest that lists them
    for folder in folders:
        syncs = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and p == folder]
        assert len(syncs) == 1, (folder, syncs)
        manifests = [i for i, (kind, p) in enumerate(events) if kind == "rename" and p == str(out / "manifest.json")]
        assert max(renamed) < syncs[0] < manifests[-1]
    listed = json.loads((out / "manifest.json").read_text())["outputs"]
    assert set(result.lights) <= set(listed)
    # the masters' folder keeps its fsync per master
    masters = [i for i, (kind, p) in enumerate(events) if kind == "rename" and "/masters/" in p and p.endswith(".fits")]
    master_syncs = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and p == str(out / "masters")]
    assert masters and len(master_syncs) >= len(masters)
