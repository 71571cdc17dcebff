"""Experiment 022's seq4 table from runs/e022/artifacts/*_scores.json (VF+GS and mean Dice per arm and seed)."""

import json
from pathlib import Path

from training.metrics import vocal_folds_glottal_dice

rows = {}
for path in sorted(Path("runs/e022/artifacts").glob("e022-*_scores.json")):
    arm, seed = path.name.removeprefix("e022-").removesuffix("_scores.json").rsplit("-seed", 1)
    summary = json.loads(path.read_text())
    rows.setdefault(arm, {})[int(seed)] = (vocal_folds_glottal_dice(summary["dice"]), summary["mean_dice"])
print("| arm | VF+GS seed 0 / 1 | VF+GS mean | mean Dice seed 0 / 1 | mean Dice mean |")
print("| --- | ---: | ---: | ---: | ---: |")
for arm, seeds in rows.items():
    vf = [seeds[s][0] for s in sorted(seeds)]
    md = [seeds[s][1] for s in sorted(seeds)]
    print(
        f"| {arm} | {' / '.join(f'{v:.3f}' for v in vf)} | {sum(vf) / len(vf):.3f} "
        f"| {' / '.join(f'{v:.3f}' for v in md)} | {sum(md) / len(md):.3f} |"
    )
