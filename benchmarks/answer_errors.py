"""How a model's greedy answers on one lab skill go wrong: exact match, the share of answer
characters right at their place (in all, and by place), the share of answers of the right
length, and examples.

    python benchmarks/answer_errors.py --lab dam-lab --skill shift MODEL_DIR [MODEL_DIR ...]
"""

import argparse
import os

from mergekit_dam.lab import SKILLS, build
from mergekit_dam.tools.compare import Scorer, read_records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="model directories (a merge, an expert)")
    parser.add_argument("--lab", default="dam-lab")
    parser.add_argument("--skill", choices=SKILLS, default="shift")
    parser.add_argument("--n", type=int, default=None, help="the first n held-out prompts (default: all)")
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()
    manifest = build(os.path.abspath(args.lab), progress=False)
    records = read_records(manifest["skills"][args.skill]["held_out"])[: args.n]
    answers = [r["answer"] for r in records]
    for path in args.models:
        outputs = Scorer(path).answers(records)  # as compare's exact match decodes them
        exact = sum(o == a for o, a in zip(outputs, answers)) / len(records)
        characters = sum(sum(x == y for x, y in zip(o, a)) for o, a in zip(outputs, answers)) / sum(map(len, answers))
        length = sum(len(o) == len(a) for o, a in zip(outputs, answers)) / len(records)
        places = range(max(map(len, answers)))
        by_place = [sum(len(o) > k and o[k] == a[k] for o, a in zip(outputs, answers) if len(a) > k) / sum(len(a) > k for a in answers)
                    for k in places]
        print(f"{path}: exact match {exact:.2f}, characters right {characters:.2f} (by place: "
              f"{' '.join(f'{share:.2f}' for share in by_place)}), right length {length:.2f}")
        for record, output in list(zip(records, outputs))[: args.examples]:
            print(f"  {record['prompt']!r:>24} -> {output!r} (answer {record['answer']!r})")


if __name__ == "__main__":
    main()
