"""The merge lab: tiny models with clearly different skills, built offline, and the demo
that merges them through mergekit-yaml (the tools that score merges are in tools/).

  skills.py  the skills' generated prompt/answer pairs and general text
  builder.py the lab: a base, one fine-tuned expert per skill, data splits, lm-eval tasks
  tiny.py    tiny tokenizer, configs and model families (tests and benchmarks)
  demo.py    the README's demo: DAM and the simple merges on the lab, compared
"""

from mergekit_dam.lab.builder import Recipe, build, fine_tune, fingerprint
from mergekit_dam.lab.skills import SKILLS, sample, skill_generators

__all__ = ["SKILLS", "Recipe", "build", "fine_tune", "fingerprint", "sample", "skill_generators"]
