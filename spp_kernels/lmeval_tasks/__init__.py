"""lm-eval task definitions shipped with spp-kernels (read by lm-eval, not imported).

`wiki_title_mc` (wiki_title_mc.yaml, data from wiki_title_mc.py): a 4-way multiple-choice
task made for this project from the held-out Wikipedia articles of spp_kernels.datasets:
given an article's first sentence with its title masked ("___"), pick the title. Run it
with `spp eval --tasks wiki_title_mc` or `spp_kernels.evaluate.zero_shot(...)`, which pass
this directory to lm-eval as an include path.
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("wiki_title_mc",)
