"""Layer-wise concept embeddings: one [rows, context width] table per concept word (notes §1.2;
SD1.5 [16, 768]; SDXL clip_l ‖ clip_g columns, one row per layer or per spatial transformer).

An initialiser is `<rand-σ>` (one N(0, σ²) vector copied to every layer row, as on the
original's main branch) or an existing single-token word such as `man`, whose embedding
row is copied to every layer row.
"""
import random
import re

import torch

RANDOM_INIT = re.compile(r"^<rand-([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)>$")
CLASS_WORD = re.compile(r"^[^\s<>,]+$")


def parse_initializer(spec):
    """("random", σ) or ("word", word); raises ValueError for anything else."""
    spec = spec.strip()
    match = RANDOM_INIT.match(spec)
    if match:
        return "random", float(match.group(1))
    if CLASS_WORD.match(spec):
        return "word", spec
    raise ValueError(f"initializer {spec!r}: write <rand-0.013> for a random start or one existing word "
                     f"such as man, woman, dog")


def initial_table(spec, num_layers, dim, word_row, seed, concept_word):
    """[num_layers, dim] start table. word_row(word) -> [dim] embedding row of a single-token
    word. The random vector depends on the seed and the concept word, so two concepts trained
    with the same seed do not start from the same vector."""
    kind, value = parse_initializer(spec)
    if kind == "random":
        generator = torch.Generator().manual_seed(random.Random(f"{seed}:init:{concept_word}").getrandbits(63))
        row = torch.randn(dim, generator=generator) * value
    else:
        row = word_row(value).detach().float().cpu()
    return row.expand(num_layers, dim).clone()


def mean_row_norm(tables, columns=None):
    """Mean L2 norm over every layer row of every concept word (the emb-norm freeze test), of the
    first `columns` columns of each row (None: whole rows)."""
    rows = torch.cat([t.detach().float() for t in tables.values()])
    return rows[:, :columns].norm(dim=-1).mean().item()
