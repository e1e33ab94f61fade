"""manifest.json as Manifest.write makes it: the text json.dumps(indent=1) gives for the same
document, although the fixed parts and each output's entry are encoded once and reused."""

from __future__ import annotations

import json
from pathlib import Path

from ccdcal.io.manifest import Manifest, OutputRecord


def _expected(body: dict, outputs: dict) -> str:
    return json.dumps({**body, "outputs": outputs}, indent=1, default=str)


def test_write_is_json_dumps_of_the_document(tmp_path: Path) -> None:
    (tmp_path / "calibrated").mkdir()
    manifest = Manifest(tmp_path)
    inputs = [{"path": "raw/a.fits", "n": [1, 2, {"x": None}], "z": 1.5}, {"path": Path("raw/b é.fits")}]
    plan = {"masters": [{"name": "bias", "from": ["a", "b"]}], "empty": {}, "none": []}
    manifest.fix({"inputs": inputs, "plan": plan})

    def body(n: int) -> dict:
        return {"ccdcal_version": "9", "created": f"t{n}", "inputs": inputs, "plan": plan,
                "skipped": [{"why": 'a "quoted"\nline'}] * n, "timings": {"masters": 0.1 * n}}

    manifest.write(body(0))        # no outputs yet
    assert (tmp_path / "manifest.json").read_text() == _expected(body(0), {})
    for n, name in enumerate(("b.fits", "a.fits", "c.fits"), start=1):
        (tmp_path / "calibrated" / name).write_bytes(name.encode())
        manifest.record(OutputRecord(output=f"calibrated/{name}", kind="light", fingerprint=str(n),
                                     inputs=({"path": name, "list": [1, [2, 3]]},), extra={"k": {"d": []}}))
        manifest.write(body(n))
        text = (tmp_path / "manifest.json").read_text()
        assert text == _expected(body(n), dict(sorted(manifest.outputs.items())))
    odd = {**body(3), None: 1, True: [{}], 2.5: "x"}           # names json.dumps writes its own way
    manifest.write(odd)
    assert (tmp_path / "manifest.json").read_text() == _expected(odd, dict(sorted(manifest.outputs.items())))
    # a fixed part replaced by another object is encoded afresh, not taken from the cache
    changed = {**body(3), "plan": {"masters": []}}
    manifest.write(changed)
    assert json.loads((tmp_path / "manifest.json").read_text())["plan"] == {"masters": []}


def test_previous_outputs_stay_listed_after_this_runs(tmp_path: Path) -> None:
    (tmp_path / "calibrated").mkdir()
    first = Manifest(tmp_path)
    for name in ("a.fits", "b.fits"):
        (tmp_path / "calibrated" / name).write_bytes(name.encode())
        first.record(OutputRecord(output=f"calibrated/{name}", kind="light", fingerprint=name))
    first.write({"ccdcal_version": "9"})
    again = Manifest(tmp_path)
    again.record(OutputRecord(output="calibrated/b.fits", kind="light", fingerprint="new"))
    again.write({"ccdcal_version": "9"})
    written = json.loads((tmp_path / "manifest.json").read_text())["outputs"]
    assert list(written) == ["calibrated/b.fits", "calibrated/a.fits"]
    assert written["calibrated/b.fits"]["fingerprint"] == "new"
    assert written["calibrated/a.fits"]["fingerprint"] == "a.fits"
    assert (tmp_path / "manifest.json").read_text() == _expected({"ccdcal_version": "9"}, written)
