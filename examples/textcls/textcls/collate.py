"""The padding collate: a list of ({"ids": [T_i]}, label) items -> ({"ids": [N, T], "mask": [N, T]}, [N])."""

import torch

PAD = 0


def pad(items):
    longest = max(len(inputs["ids"]) for inputs, _ in items)
    ids = torch.full((len(items), longest), PAD, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, (inputs, _) in enumerate(items):
        ids[row, :len(inputs["ids"])], mask[row, :len(inputs["ids"])] = inputs["ids"], True
    return {"ids": ids, "mask": mask}, torch.tensor([label for _, label in items])
