"""Sequence and loss parallelism against the unsharded model (tests/test_tensor_parallel.py runs this).

    torchrun --standalone --nproc_per_node=2 tests/tp_forward.py OUT.json

On a tp mesh of every rank (gloo), each layout is applied by dtrain's own code (tensor.plan_of, tensor.apply,
the loss as the training step computes it) to a copy of a model, and one forward and backward on the same
batch is compared with the unsharded copy's: the logits, the loss and every gradient, as max abs differences.
Rank 0 writes them, with the one-line refusals of a tie split two ways and a sequence of the wrong length.
"""

import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from dtrain.errors import ConfigError, DataError
from dtrain.gpt import GPT
from dtrain.strategy import tensor
from dtrain.tasks.language_modeling import LanguageModeling


class Tagger(nn.Module):
    """A user's per-position model ([N, T, F] -> [N, T, C]) whose norm and dropout (a module without
    parameters: it runs on a plain slice) a dist.tp_plan marks `sequence`."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.drop = nn.Linear(6, 16), nn.LayerNorm(16), nn.Dropout(0.0)
        self.w1, self.w2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = self.drop(self.norm(self.inp(x)))
        return self.head(h + self.w2(torch.relu(self.w1(h))))


def compare(make, batch, target, plan_args, mesh, loss_parallel=False):
    torch.manual_seed(0)
    ref, model = make(), make()
    model.load_state_dict(ref.state_dict())
    tensor.apply(model, mesh, tensor.plan_of(model, *plan_args))
    if any(plan_args[2:3]):  # sequence_parallel
        tensor.check_sequence_length(model, mesh.size())
    if loss_parallel:
        tensor.enable_loss_parallel()
    loss_of = LanguageModeling().loss
    expected = ref(batch)
    loss_of(expected, target).backward()
    out = model(batch)
    loss = tensor.whole(loss_of(out.float(), target))
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    return {"split_logits": hasattr(out, "placements"),
            "logits": (tensor.whole(out.detach()) - expected).abs().max().item(),
            "loss": (loss - loss_of(expected, target)).abs().item(),
            "grads": max((tensor.whole(p.grad) - grads[n]).abs().max().item() for n, p in model.named_parameters()),
            "same_parameters": len(list(model.parameters())) == len(list(ref.parameters())),  # a tie stays one
            "tied": getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.wte.weight}


def main(out_path):
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    tp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,))
    g = torch.Generator().manual_seed(1)
    tokens, target = torch.randint(65, (4, 16), generator=g), torch.randint(65, (4, 16), generator=g)
    target[0, :3] = -100  # ignored positions count for nothing, split or not
    gpt = lambda: GPT(65, 16, n_layer=2, n_head=4, n_embd=32)  # noqa: E731 (65: a vocabulary tp does not divide)
    results = {
        "sequence": compare(gpt, tokens, target, (None, tp, True, False), mesh),
        "loss": compare(gpt, tokens, target, (None, tp, False, True), mesh, loss_parallel=True),
        "both": compare(gpt, tokens, target, (None, tp, True, True), mesh, loss_parallel=True),
        "tp_plan_sequence": compare(Tagger, torch.randn(4, 8, 6, generator=g), torch.randint(5, (4, 8), generator=g),
                                    ([{"module": "norm", "style": "sequence"}, {"module": "drop", "style": "sequence"},
                                      {"module": "w1", "style": "colwise"},
                                      {"module": "w2", "style": "rowwise"}], tp, True, False), mesh),
    }
    try:
        model = GPT(64, 16, n_layer=2, n_head=4, n_embd=32)  # its head split by vocabulary, its embedding whole
        tensor.apply(model, mesh, tensor.plan_of(model, [{"module": "lm_head", "style": "colwise"}], tp))
    except ConfigError as e:
        results["tie_refused"] = str(e)
    model = gpt()
    tensor.apply(model, mesh, tensor.plan_of(model, None, tp, True, False))
    tensor.check_sequence_length(model, tp)
    try:
        model(tokens[:, :15])
    except DataError as e:
        results["length_refused"] = str(e)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    gc.collect()  # as dtrain's world does: the models' meshes release the group before it is destroyed
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
