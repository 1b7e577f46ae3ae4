"""PII benchmark: precision and recall on the labelled test set, throughput, and what the scrubber
finds in the Python standard library.

    python benchmarks/pii.py [--list] [--shakespeare PATH]

Prints:
- per kind, on tests/data/pii (planted.jsonl + lookalikes.jsonl; see scripts/make_pii_testset.py):
  planted values, recall, findings, precision; and the look-alike documents with any finding;
- throughput of `Scrubber("redact").scrub` in MB/s, one document at a time, on every .py file of the
  standard library and on tinyshakespeare.txt cut into 64 KiB documents (one core);
- the whole standard library as "clean code": documents with any redaction, redacted spans per MB,
  per kind. Most of these are real: author e-mail addresses, addresses in ipaddress/socket tests,
  `tel:` numbers in urlparse tests. `--list` prints every finding with its context to audit them.
The machine load (uptime) is printed first: figures taken while other jobs run are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from collections import Counter
from pathlib import Path

from lmforge.data.pii import KINDS, Scrubber, evaluate

TESTSET = Path(__file__).resolve().parents[1] / "tests" / "data" / "pii"


def load_testset() -> list[dict]:
    docs = []
    for name in ("planted.jsonl", "lookalikes.jsonl"):
        with open(TESTSET / name, encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def throughput(scrubber: Scrubber, docs: list[str]) -> float:
    size = sum(len(d.encode()) for d in docs) / 1e6
    start = time.perf_counter()
    for d in docs:
        scrubber.scrub(d)
    return size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every finding in the standard library")
    parser.add_argument("--shakespeare", type=Path, default=Path("/work/shared/data/tinyshakespeare.txt"))
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    scrubber = Scrubber()

    docs = load_testset()
    result = evaluate(docs, scrubber)
    lookalike_docs = [d for d in docs if d["lookalikes"]]
    lookalike_result = evaluate(lookalike_docs, scrubber)
    print(f"\ntest set: {len(docs)} documents ({len(lookalike_docs)} with look-alikes only)")
    print("| kind | planted | recall | findings | precision |")
    print("|---|---:|---:|---:|---:|")
    for kind in KINDS:
        row = result["kinds"][kind]
        print(f"| {kind} | {row['planted']} | {row['recall']:.3f} | {row['findings']} | {row['precision']:.3f} |")
    n_false = lookalike_result["documents_with_false_positive"]
    print(f"look-alike documents with a finding: {n_false} / {len(lookalike_docs)} "
          f"({100 * n_false / len(lookalike_docs):.2f} %)")
    for fp in result["false_positives"]:
        print(f"  false positive {fp['id']} {fp['kind']}: {fp['text']!r}")

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    stdlib = [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    prose_text = args.shakespeare.read_text(encoding="utf-8")
    prose = [prose_text[i:i + 65536] for i in range(0, len(prose_text), 65536)]
    code_mb = sum(len(t.encode()) for _, t in stdlib) / 1e6
    print(f"\nthroughput (redact, one core): stdlib {code_mb:.1f} MB in {len(stdlib)} files: "
          f"{throughput(scrubber, [t for _, t in stdlib]):.1f} MB/s; "
          f"tinyshakespeare {len(prose_text) / 1e6:.1f} MB: {throughput(scrubber, prose):.1f} MB/s")

    with_finding, spans = 0, Counter()
    for name, text in stdlib:
        findings = scrubber.find(text)
        with_finding += bool(findings)
        spans.update(f.kind for f in findings)
        if args.list:
            for f in findings:
                context = text[max(0, f.start - 40):f.end + 20].replace("\n", "\\n")
                print(f"  {f.kind}\t{name}\t{text[f.start:f.end]!r}\t{context}")
    print(f"stdlib as clean code: {with_finding} / {len(stdlib)} files with any redaction "
          f"({100 * with_finding / len(stdlib):.1f} %); redacted spans per MB: "
          + ", ".join(f"{k} {spans[k] / code_mb:.2f}" for k in KINDS))


if __name__ == "__main__":
    main()
