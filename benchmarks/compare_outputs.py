"""Compare two output folders of ``ccdcal reduce`` (or trees of them) bit for bit.

Every FITS file under BASE must exist under AFTER with the same HDUs, the same data bytes
(dtype, shape, bytes) and the same header cards in order, value and comment; DATE and
CHECKSUM are left out, and run times inside HISTORY cards and DATASUM comments are masked.
The manifests' fingerprints must be equal too. Used to show that a refactor changed no output:

    python benchmarks/compare_outputs.py BASE_OUT AFTER_OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from astropy.io import fits

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")
SKIP = {"DATE", "CHECKSUM"}


def _cards(header: fits.Header) -> list[tuple[str, str, str]]:
    return [(c.keyword, STAMP.sub("<time>", str(c.value)) if c.keyword in ("HISTORY", "COMMENT") else str(c.value),
             STAMP.sub("<time>", c.comment)) for c in header.cards if c.keyword not in SKIP]


def compare(base: Path, after: Path) -> tuple[list[str], dict[str, int]]:
    """The differences between the trees (empty when identical) and what was compared."""
    problems: list[str] = []
    counts = {"files": 0, "planes": 0, "cards": 0}
    for b in sorted(base.rglob("*.fits")):
        rel = b.relative_to(base)
        a = after / rel
        if not a.exists():
            problems.append(f"missing {rel}")
            continue
        with fits.open(b) as hb, fits.open(a) as ha:
            if len(hb) != len(ha):
                problems.append(f"{rel}: {len(hb)} vs {len(ha)} HDUs")
                continue
            counts["files"] += 1
            for i, (x, y) in enumerate(zip(hb, ha, strict=True)):
                if (x.data is None) != (y.data is None):
                    problems.append(f"{rel}[{i}]: data in one only")
                elif x.data is not None:
                    counts["planes"] += 1
                    if x.data.dtype != y.data.dtype or x.data.shape != y.data.shape or \
                            x.data.tobytes() != y.data.tobytes():
                        problems.append(f"{rel}[{i}]: data differ")
                cards_b, cards_a = _cards(x.header), _cards(y.header)
                counts["cards"] += len(cards_b)
                if cards_b != cards_a:
                    first = next(((p, q) for p, q in zip(cards_b, cards_a, strict=False) if p != q), None)
                    problems.append(f"{rel}[{i}]: header differs, first {first}")
    extra = sorted(str(p.relative_to(after)) for p in after.rglob("*.fits") if not (base / p.relative_to(after)).exists())
    if extra:
        problems.append(f"only in {after}: {extra}")
    for m in sorted(base.rglob("manifest.json")):
        prints = [{k: v.get("fingerprint") for k, v in json.loads(p.read_text())["outputs"].items()}
                  for p in (m, after / m.relative_to(base))]
        if prints[0] != prints[1]:
            problems.append(f"{m.relative_to(base)}: fingerprints differ")
    return problems, counts


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    problems, counts = compare(Path(argv[0]), Path(argv[1]))
    print(f"{counts['files']} FITS files, {counts['planes']} planes, {counts['cards']} header cards compared"
          " (DATE and CHECKSUM left out, run times masked)")
    print("\n".join(problems) if problems else "identical")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
