"""Checks of saved AutoAttack chunks before their counts enter a result (eval/autoattack.py).

A chunk holds, per image, whether the model was right on the clean image and after each attack
stage. Two properties hold for every chunk AutoAttack itself wrote, and a chunk that breaks one
(edited by hand, damaged, or written by other code) is refused by name instead of being summed:

* each stage runs only on the images the previous stages left correct, so its correct set is a
  subset of the previous one's (and the first stage's of the clean set);
* the clean set is the model's clean predictions: a forward pass over the chunk's images now must
  give it again (up to images whose top two logits tie within float noise).

The second check costs one forward pass over the chunk, a small fraction of the attack; it also
runs at `--merge`, which attacks nothing (docs/evaluation.md#autoattack).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

CHUNK_NAME = re.compile(r"chunk_(\d{6})_(\d{6})\.pt$")
# A recomputed prediction may differ from the saved one only where the logits of the true class
# and the best other class are this close (relative to the largest logit): a tie that another
# batch size or kernel can break either way.
TIE = 1e-4


def outcome_problem(outcome: dict, stages: list[str], n: int) -> str | None:
    """Why `outcome` ({'clean': bool (n,), stage: bool (n,), ...}) cannot be AutoAttack's, or
    None."""
    keys = ["clean", *stages]
    for key in keys:
        value = outcome.get(key)
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.bool
                and value.shape == (n,)):
            return f"its '{key}' entry is not a boolean vector of its {n} images"
    for before, after in zip(keys, keys[1:]):
        extra = (outcome[after] & ~outcome[before]).nonzero().flatten()
        if len(extra):
            return (f"{len(extra)} image(s) correct after {after} but not after {before} "
                    f"(image {int(extra[0])} of the chunk): a stage only attacks the images "
                    f"the previous one left correct")
    return None


def clean_problem(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor,
                  batch_size: int) -> str | None:
    """Why the saved clean outcome `clean` is not the model's clean predictions on (x, y)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(x), batch_size)])
    right = logits.argmax(1) == y
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    tie = (true - other).abs() <= TIE * logits.abs().amax(1).clamp_min(1.0)
    wrong = ((right != clean) & ~tie).nonzero().flatten()
    if len(wrong):
        return (f"its clean outcome differs from the model's predictions now on {len(wrong)} "
                f"image(s) (image {int(wrong[0])} of the chunk: saved "
                f"{'correct' if clean[wrong[0]] else 'wrong'}, now "
                f"{'correct' if right[wrong[0]] else 'wrong'})")
    return None


def chunk_size_hint(chunk_dir: Path, expected: set[str]) -> str:
    """When the directory holds chunks of another --chunk-size than asked: which one."""
    sizes = Counter()
    for path in chunk_dir.glob("chunk_*.pt"):
        match = CHUNK_NAME.match(path.name)
        if match and path.name not in expected:
            sizes[int(match.group(2)) - int(match.group(1))] += 1
    if not sizes:
        return ""
    size = sizes.most_common(1)[0][0]
    return (f"; {chunk_dir.name} holds {sum(sizes.values())} chunk(s) of another --chunk-size "
            f"({size}, as far as their names tell): merge with the --chunk-size the shards used")
