"""Write the installed easy-vqa package (pip install easy-vqa) in the layouts the trainer reads.

    flamingo-prepare-easy-vqa --out data/easy-vqa

Writes OUT/{train,test}_questions.json and OUT/{train,test}_annotations.json (the VQAv2 layout; images stay in
the package, named {image_id}.png), and the training data of yamls/eval-easyvqa.yaml (train split only):
OUT/mds/train/ (MMC4 MDS documents of 5 image-question-answer pairs in the few-shot VQA prompt format, answers
balanced per question text) and OUT/mds/what_pairs/ (LAION MDS pairs of the "what" questions in the same prompt
format: image -> "Question:{q} Short answer:{a}").
Prints what it wrote as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (must not hold an mds/train already)")
    parser.add_argument("--per-document", type=int, default=5, help="QA pairs per training document")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from flamingo_composer.eval.easy_vqa import (
        write_easy_vqa_vqav2,
        write_fewshot_training_mds,
        write_vqa_pairs_mds,
    )

    out = Path(args.out)
    mds, pairs_dir = out / "mds" / "train", out / "mds" / "what_pairs"
    for folder in (mds, pairs_dir):
        if folder.exists() and any(folder.iterdir()):
            print(f"error: {folder} exists and is not empty", file=sys.stderr)
            return 2
    paths = write_easy_vqa_vqav2(out)
    docs = write_fewshot_training_mds(mds, per_document=args.per_document, seed=args.seed)
    pairs = write_vqa_pairs_mds(pairs_dir)
    summary = {
        "vqav2_layout": paths,
        "training_documents": {"mds": str(mds), "count": docs},
        "what_pairs": {"mds": str(pairs_dir), "count": pairs},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
