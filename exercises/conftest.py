"""Shared by every grader: the import paths. Which implementation is graded (exercises/grading.py):

    python -m pytest exercises/lora                         # exercises/lora/stub.py (yours)
    EXERCISE_IMPL=solution python -m pytest exercises/lora  # exercises/solutions/lora.py
    EXERCISE_IMPL=some/folder python -m pytest exercises    # some/folder/<exercise>.py

The graders never read the reference solutions: they grade by properties and by comparison with the
project's own code (model.py, adapters.py, data/scoring.py) or PEFT. The students' copy
(exercises/handout.py) leaves exercises/solutions/ out; there EXERCISE_IMPL=solution skips.
A graded file must keep the rules of exercises/README.md, checked as it is loaded (grading.py).
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):  # `import model, adapters` and `from grading import ...` in a grader
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
torch.set_num_threads(1)  # tiny models: one thread beats a pool on a shared CPU
