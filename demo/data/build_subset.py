"""Rebuild ``movie_snippets.tsv`` from the vaderSentiment 3.3.2 source distribution (MIT).

The demo ships the TSV, so this only documents and reproduces where the data came from::

    pip download --no-deps --no-binary :all: -d /tmp/vader vaderSentiment==3.3.2
    python demo/data/build_subset.py /tmp/vader/vaderSentiment-3.3.2.tar.gz

The sdist holds ``additional_resources/hutto_ICWSM_2014.tar.gz`` (Hutto & Gilbert, ICWSM 2014), whose
``movieReviewSnippets_GroundTruth.txt`` gives, for 10,605 movie-review sentences (Pang & Lee, 2005), the mean
sentiment rating of about 20 human raters on a -4..+4 scale. We keep sentences rated clearly positive or
negative (|mean| >= 0.5) and draw a class-balanced, seeded sample, split into train and test.
"""

from __future__ import annotations

import argparse
import io
import random
import tarfile
from pathlib import Path

INNER = "additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MIN_ABS_SCORE = 0.5
PER_CLASS = {"train": 1000, "test": 250}
SEED = 0


def read_ground_truth(sdist: Path) -> list[tuple[str, float, str]]:
    """(id, mean rating, sentence) rows from the nested tarball inside the sdist."""
    with tarfile.open(sdist) as outer:
        inner_name = next(n for n in outer.getnames() if n.endswith(INNER))
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(MEMBER).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        sid, score, sentence = line.split("\t", 2)
        rows.append((sid, float(score), " ".join(sentence.split())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to vaderSentiment-3.3.2.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("movie_snippets.tsv"))
    args = parser.parse_args()

    rows = [r for r in read_ground_truth(args.sdist) if abs(r[1]) >= MIN_ABS_SCORE and "\t" not in r[2]]
    seen: set[str] = set()
    unique = [r for r in rows if not (r[2].lower() in seen or seen.add(r[2].lower()))]
    rng = random.Random(SEED)
    by_class = {sign: [r for r in unique if (r[1] > 0) == sign] for sign in (True, False)}
    out = ["id\tsplit\tscore\ttext"]
    for pool in by_class.values():
        rng.shuffle(pool)
    for split, n in PER_CLASS.items():
        picked = [r for pool in by_class.values() for r in pool[:n]]
        for pool in by_class.values():
            del pool[:n]
        rng.shuffle(picked)  # mixed classes, so any prefix (--max-train/--max-test) stays about balanced
        out += [f"{sid}\t{split}\t{score:g}\t{text}" for sid, score, text in picked]
    args.out.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"wrote {len(out) - 1} rows to {args.out}")


if __name__ == "__main__":
    main()
