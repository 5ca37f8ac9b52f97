"""modules.prompt_parser: AND sub-prompts as several cond rows per image (no scheduling here)."""

import torch


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch  # per image: list of (cond tensor or dict, weight)


def get_multicond_prompt_list(prompts):
    return [[part.strip() for part in prompt.split(" AND ")] for prompt in prompts]


def reconstruct_multicond_batch(c, current_step):
    """-> conds_list (per image: [(row index, weight)]), the stacked cond rows (images first, then sub-prompts)."""
    conds_list, rows = [], []
    for subs in c.batch:
        entry = []
        for cond, weight in subs:
            entry.append((len(rows), weight))
            rows.append(cond)
        conds_list.append(entry)
    if isinstance(rows[0], dict):
        return conds_list, DictWithShape({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return conds_list, torch.stack(rows)


def reconstruct_cond_batch(c, current_step):
    if isinstance(c[0], dict):
        return DictWithShape({k: torch.stack([r[k] for r in c]) for k in c[0]})
    return torch.stack(list(c))


class DictWithShape(dict):
    @property
    def shape(self):
        return self["crossattn"].shape
