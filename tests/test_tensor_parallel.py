"""Tensor parallelism inside FSDP2 on a 2-D mesh (issue 32, items 2-5): dist.tp splits the world into dp
groups of tp ranks; the GPT's own plan and a user's dist.tp_plan train to the same weights as FSDP alone;
a 2-D checkpoint resumes bit-identically and continues at other shapes; impossible plans are one line."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import dtrain
from conftest import CHILD_ENV, FAULTS, ROOT, Live, assert_same_weights, run_cli
from dtrain import app
from dtrain import world as w
from dtrain.errors import ConfigError
from dtrain.gpt import GPT
from dtrain.strategy import tensor
from dtrain.validate import check_world

GPT_RUN = ("experiment=char_gpt", "dist.strategy=fsdp", "model.n_layer=2", "model.n_embd=64", "trainer.device=cpu",
           "logger.plots=false")

MY_MLP = '''
import torch
from torch import nn


class Wide(nn.Module):
    """A user's sequence model: an embedding of each position, a norm (style sequence in the plan), a block
    whose w1 and w2 a dist.tp_plan splits, the positions' mean, a head."""

    def __init__(self, input_shape, num_classes, width=16, hidden=64):
        super().__init__()
        self.inp, self.norm = nn.Linear(input_shape[-1], width), nn.LayerNorm(width)
        self.block = nn.ModuleDict({"w1": nn.Linear(width, hidden), "w2": nn.Linear(hidden, width)})
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.norm(self.inp(x))
        h = h + self.block["w2"](torch.relu(self.block["w1"](h)))
        return self.head(h.mean(1))
'''


@pytest.fixture
def my_project(tmp_path):
    """A user's package and config folder: model=wide with its dist.tp_plan."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "my_mlp.py").write_text(MY_MLP)
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "wide.yaml").write_text("_target_: my_mlp.Wide\nname: wide\nwidth: 16\nhidden: 64\n")
    return tmp_path


PAIR = "{module: block.w1, style: colwise},{module: block.w2, style: rowwise}"
NORM = "{module: norm, style: sequence}"


def wide_run(my_project, *overrides, plan=f"[{PAIR}]"):
    return ("--config-dir", str(my_project / "conf"), "model=wide", "data=synthetic", "data.shape=[8,12]",
            "data.num_samples=1200", "data.batch_size=32", "optim=adamw", "trainer.grad_clip=0.5",
            "dist.strategy=fsdp", "trainer.device=cpu", "logger.plots=false",
            f"dist.tp_plan={plan}", *overrides)


def weights(run_dir) -> dict:
    return dtrain.load_model(run_dir / "checkpoints" / "latest").net.state_dict()  # a 2-D DCP, in one process


# -- plans and refusals (one process) ---------------------------------------------------------------------

@pytest.mark.unit
def test_the_gpts_own_plan_splits_attention_and_mlp_and_a_user_plan_names_modules_by_glob():
    model = GPT(vocab_size=10, block_size=8, n_layer=2, n_head=4, n_embd=32)
    plan = tensor.plan_of(model, None, 2)
    assert plan == {f"h.{i}.{m}": s for i in (0, 1) for m, s in (
        ("attn.q", "colwise"), ("attn.k", "colwise"), ("attn.v", "colwise"), ("attn.proj", "rowwise"),
        ("mlp.fc", "colwise"), ("mlp.proj", "rowwise"))}
    mine = tensor.plan_of(model, [{"module": "h.0.mlp.fc", "style": "colwise"},
                                  {"module": "h.*.mlp.fc", "style": "rowwise"}], 2)  # the first match wins
    assert mine == {"h.0.mlp.fc": "colwise", "h.1.mlp.fc": "rowwise"}


@pytest.mark.unit
@pytest.mark.parametrize("plan,tp,message", [
    (None, 3, "dist.tp=3: model.n_head=4 heads do not split evenly over 3 ranks"),
    ([{"module": "h.*.mlp.fc", "style": "colwise"}, {"module": "h.*.mlp.*", "style": "rowwise"}], 2,
     "dist.tp_plan: h.0.mlp.dropout is a Dropout; the rowwise style splits an nn.Linear"),
    ([{"module": "blocks.*.fc", "style": "colwise"}], 2,
     "dist.tp_plan[0].module='blocks.*.fc' matches no module of GPT"),
    ([{"module": "h.0.mlp.fc", "style": "diagonal"}], 2, "dist.tp_plan[0].style='diagonal' is not allowed"),
    ([{"module": "h.0.ln_1", "style": "sequence"}], 2,
     "dist.sequence_parallel=true needs dist.tp_plan entries of style sequence"),  # the flag is not set
    ([{"module": "lm_head"}], 2, "dist.tp_plan[0]={'module': 'lm_head'} is not allowed"),
    ([{"module": "h.0.mlp.fc", "style": "colwise"}], 3,
     "dist.tp_plan: h.0.mlp.fc has 128 output features, which do not divide by dist.tp=3"),
])
def test_an_impossible_plan_is_one_line_naming_the_layer_and_sizes(plan, tp, message):
    model = GPT(vocab_size=10, block_size=8, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ConfigError) as refused:
        tensor.plan_of(model, plan, tp)
    assert str(refused.value).startswith(message), refused.value


@pytest.mark.unit
def test_with_sequence_and_loss_parallelism_the_gpts_plan_splits_the_stream_by_position_and_the_head_by_token():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
    model = GPT(vocab_size=65, block_size=8, n_layer=2, n_head=4, n_embd=32)
    plan = tensor.plan_of(model, None, 2, sequence_parallel=True, loss_parallel=True)
    assert isinstance(plan["wte"], RowwiseParallel) and plan["wte"].output_layouts == (Shard(1),)
    assert isinstance(plan["wpe"], RowwiseParallel) and plan["wpe"].output_layouts == (Shard(0),)  # positions
    assert all(isinstance(plan[m], SequenceParallel) for m in ("ln_f", "h.0.ln_1", "h.1.ln_2"))
    assert "drop" not in plan  # dropout draws on its plain slice
    assert all(isinstance(plan[m], PrepareModuleInput) for m in ("h.0.attn", "h.1.mlp"))  # gathered on entry
    assert plan["h.0.attn.proj"].output_layouts == (Shard(1),) and plan["h.1.attn.q"] == "colwise"
    head = plan["lm_head"]  # split logits, handed to the cross-entropy as they are (65: uneven is fine here)
    assert isinstance(head, ColwiseParallel) and head.output_layouts == (Shard(-1),) and not head.use_local_output
    loss_only = tensor.plan_of(model, None, 2, loss_parallel=True)
    assert "ln_f" not in loss_only and loss_only["wte"].output_layouts != (Shard(1),)
    mine = tensor.plan_of(model, [{"module": "h.*.ln_?", "style": "sequence"}], 2, sequence_parallel=True)
    assert mine == {f"h.{i}.ln_{j}": "sequence" for i in (0, 1) for j in (1, 2)}


class OldPlan(torch.nn.Module):
    """A model whose own plan predates sequence and loss parallelism."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def tp_plan(self, tp):
        return {"fc": "colwise"}


@pytest.mark.unit
@pytest.mark.parametrize("model,plan,flags,message", [
    (OldPlan(), None, (True, False), "dist.sequence_parallel=true but OldPlan.tp_plan takes no sequence_parallel"),
    (OldPlan(), None, (False, True), "dist.loss_parallel=true but OldPlan.tp_plan takes no loss_parallel argument"),
    (OldPlan(), [{"module": "fc", "style": "colwise"}], (False, True),
     "dist.loss_parallel=true splits the model's output head, which only the model's own tp_plan knows"),
    (OldPlan(), [{"module": "fc", "style": "colwise"}], (True, False),
     "dist.sequence_parallel=true needs dist.tp_plan entries of style sequence"),
])
def test_sequence_and_loss_parallelism_need_a_plan_that_lays_the_model_out_for_them(model, plan, flags, message):
    with pytest.raises(ConfigError) as refused:
        tensor.plan_of(model, plan, 2, *flags)
    assert str(refused.value).startswith(message), refused.value


@pytest.mark.unit
def test_a_model_without_a_plan_needs_dist_tp_plan():
    with pytest.raises(ConfigError, match=r"dist.tp=2: Linear has no tensor-parallel plan of its own; give dist.tp_"):
        tensor.plan_of(torch.nn.Linear(4, 4), None, 2)


@pytest.mark.unit
@pytest.mark.parametrize("overrides,world_size,message", [
    (("dist.strategy=ddp", "dist.tp=2"), 4, "dist.tp=2 is not allowed: tensor parallelism needs dist.strategy=fsdp"),
    (("dist.strategy=fsdp", "dist.tp=3"), 4, "dist.tp=3 is not allowed: the 4 rank(s) must split into groups"),
    (("dist.strategy=fsdp", "dist.tp=2", "data.batch_size=33"), 4,
     "data.batch_size=33 is not allowed: the global batch must divide evenly by the world size 4 (2 data-parallel"),
    (("dist.strategy=fsdp", "dist.tp_plan=[{module: x, style: colwise}]"), 2, "dist.tp_plan=[{'module': 'x'"),
    (("dist.strategy=fsdp", "dist.tp=2", "dist.fsdp.meta_init=true"), 4, "dist.fsdp.meta_init=True is not allowed"),
    (("dist.strategy=fsdp", "dist.sequence_parallel=true"), 2, "dist.sequence_parallel=True is not allowed: it splits"),
    (("dist.strategy=fsdp", "dist.tp=2", "dist.loss_parallel=true", "trainer.label_smoothing=0.1"), 4,
     "dist.loss_parallel=True is not allowed: it computes the task's own cross-entropy on logits split"),
    (("dist.strategy=fsdp", "dist.tp=2", "dist.loss_parallel=true", "+loss._target_=torch.nn.CrossEntropyLoss"), 4,
     "dist.loss_parallel=True is not allowed: it computes the task's own cross-entropy on logits split"),
])
def test_a_world_that_cannot_be_laid_out_is_one_line(overrides, world_size, message):
    with pytest.raises(ConfigError) as refused:
        cfg = app.make_config(app.compose(["model=gpt", "data=text", *overrides]))
        check_world(cfg, w.World(world_size=world_size))
    assert str(refused.value).startswith(message), refused.value


def test_the_launcher_refuses_tp_that_does_not_divide_its_ranks_before_any_worker_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch", "launcher.nproc_per_node=3", *GPT_RUN,
                           "dist.tp=2"], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "dtrain: error: dist.tp=2 is not allowed: the 3 rank(s) must split into groups"), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,message", [
    (("model.n_head=3", "model.n_embd=48"), "dtrain: error: dist.tp=2: model.n_head=3 heads do not split evenly"),
    (("dist.tp_plan=[{module: blocks.*, style: colwise}]",), "dtrain: error: dist.tp_plan[0].module='blocks.*' "
     "matches no module of GPT"),
])
def test_the_launcher_refuses_an_impossible_plan_before_any_worker_starts(tmp_path, overrides, message):
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch", "launcher.nproc_per_node=2", *GPT_RUN, "dist.tp=2",
                           *overrides], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder: no worker started


# -- on a mesh ------------------------------------------------------------------------------------------

def test_sequence_and_loss_parallelism_match_the_unsharded_forward_and_backward(tmp_path):
    """tests/tp_forward.py, on 2 ranks: the GPT with either or both (its vocabulary of 65 split unevenly) and a
    user's plan with a `sequence` norm give the unsharded model's logits, loss and gradients."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "tp_forward.py"), str(tmp_path / "out.json")], cwd=ROOT,
                          env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "out.json").read_text())
    for layout in ("sequence", "loss", "both", "tp_plan_sequence"):
        got = found[layout]
        assert max(got["logits"], got["loss"], got["grads"]) < 1e-5 and got["same_parameters"], (layout, got)
    assert found["loss"]["split_logits"] and found["both"]["split_logits"] and not found["sequence"]["split_logits"]
    assert found["both"]["tied"]  # the head tied to the embedding stays one parameter, split alike
    assert found["tie_refused"].startswith("tensor-parallel plan: wte.weight and lm_head.weight are one (tied) "
                                           "parameter, which the plan splits differently (whole and (Shard(dim=0),))")
    assert found["length_refused"].startswith("dist.sequence_parallel=true splits dimension 1 of the input (the "
                                              "sequence) over dist.tp=2 ranks, but a batch has shape [4, 15]")



def test_a_2x2_mesh_trains_the_gpt_reports_perplexity_and_its_checkpoint_reads_in_one_process(tmp_path):
    run = run_cli(tmp_path / "run", *GPT_RUN, "dist.tp=2", "trainer.max_steps=4", nproc=4, timeout=300)
    assert run.code == 0, run
    assert run.summary["world_size"] == 4 and run.summary["tokens_per_sec"] > 0 and "val_perplexity" in run.summary
    state = weights(run.dir)
    assert state["h.0.attn.q.weight"].shape == (64, 64)  # whole again: plain names and shapes
    # FLOPs (MFU's numerator on a GPU) are the whole model's per sample, attention's all heads included, counted
    # by hand: per position 12 E^2 per layer (q, k, v, proj; fc, proj) and E V for the head, and the attention
    # scores and their sum of values, 2 T E each per position and layer (the full T x T, as FLOP counters do);
    # 2 FLOPs a multiply-add, training 3 forwards
    T, E, L, V = 64, 64, 2, state["wte.weight"].shape[0]
    assert run.summary["flops_per_sec"] / run.summary["samples_per_sec"] == pytest.approx(
        3 * 2 * T * (12 * E * E * L + E * V + 2 * T * E * L), rel=1e-9)
    assert dtrain.evaluate(run.dir / "checkpoints" / "latest")["perplexity"] == \
        pytest.approx(run.summary["val_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_the_gpt_on_2x2_with_and_without_sequence_and_loss_parallelism_reaches_fsdp_over_4s_weights(tmp_path):
    fsdp = run_cli(tmp_path / "fsdp", *GPT_RUN, "trainer.max_steps=30", nproc=4, timeout=600)
    mesh = run_cli(tmp_path / "mesh", *GPT_RUN, "dist.tp=2", "trainer.max_steps=30", nproc=4, timeout=600)
    both = run_cli(tmp_path / "both", *GPT_RUN, "dist.tp=2", "dist.sequence_parallel=true", "dist.loss_parallel=true",
                   "trainer.max_steps=30", nproc=4, timeout=600)
    assert fsdp.code == 0 and mesh.code == 0 and both.code == 0, (fsdp, mesh, both)
    assert_same_weights(weights(fsdp.dir), weights(mesh.dir), rtol=0, atol=1e-4)
    assert_same_weights(weights(fsdp.dir), weights(both.dir), rtol=0, atol=1e-4)
    assert both.summary["val_perplexity"] == pytest.approx(fsdp.summary["val_perplexity"], rel=1e-4)


@pytest.mark.slow
def test_a_user_model_with_a_tp_plan_on_2x2_reaches_fsdp_over_4s_weights(tmp_path, my_project, monkeypatch):
    env = {"PYTHONPATH": str(my_project / "pkg")}
    plain = run_cli(tmp_path / "plain", *wide_run(my_project, "trainer.max_steps=30", "dist.tp_plan=null"),
                    nproc=4, timeout=600, env=env)
    mesh = run_cli(tmp_path / "mesh", *wide_run(my_project, "trainer.max_steps=30", "dist.tp=2",
                                                "dist.sequence_parallel=true", plan=f"[{NORM},{PAIR}]"),
                   nproc=4, timeout=600, env=env)
    assert plain.code == 0 and mesh.code == 0, (plain, mesh)
    monkeypatch.syspath_prepend(str(my_project / "pkg"))  # load_model rebuilds the user's model here
    assert_same_weights(weights(plain.dir), weights(mesh.dir), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_2x2_run_stopped_by_sigterm_resumes_bit_identically_and_continues_at_other_shapes(tmp_path):
    common = (*GPT_RUN, "trainer.max_steps=24", "trainer.log_every_n_steps=1")
    reference = run_cli(tmp_path / "ref", *common, "dist.tp=2", nproc=4, timeout=600)
    assert reference.code == 0, reference
    job = Live("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", FAULTS, *common, "dist.tp=2",
               f"hydra.run.dir={tmp_path / 'run'}", env={"DTRAIN_FAULT": "slow:0:8"})
    job.wait_for(" step 10/")
    job.signal_group(signal.SIGTERM)
    assert job.finish(timeout=300) != 0 and "checkpoint saved" in job.stdout, job
    resumed = run_cli(tmp_path / "run", *common, "dist.tp=2", nproc=4, timeout=600)
    assert resumed.code == 0 and "resumed from" in resumed.out, resumed
    assert_same_weights(weights(reference.dir), weights(tmp_path / "run"), rtol=0, atol=0)
    # The 2x2 checkpoint continues on 4 and on 2 ranks without tensor parallelism, and in one process.
    for nproc, name in ((4, "four"), (2, "two"), (1, "one")):
        shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / name / "checkpoints")
        more = run_cli(tmp_path / name, *GPT_RUN, "trainer.max_steps=30", "checkpoint.allow_config_change=true",
                       "trainer.log_every_n_steps=1", nproc=nproc, timeout=600)
        assert more.code == 0 and "resumed from" in more.out and " step 25/" in more.out, more
        assert more.summary["steps"] == 30 and more.summary["world_size"] == nproc
    latest = tmp_path / "run" / "checkpoints" / "latest"  # the 2-D checkpoint, exported in one process
    exported = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={latest}", "format=onnx",
                               f"out={tmp_path / 'gpt.onnx'}"], cwd=ROOT, env=CHILD_ENV,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0 and "onnxruntime output within" in exported.stdout, exported.stderr[-3000:]
    plain = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={latest}", "format=state_dict",
                            f"out={tmp_path / 'gpt.pt'}"], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    state = torch.load(tmp_path / "gpt.pt", map_location="cpu")
    state = state.get("model", state)
    assert_same_weights(weights(tmp_path / "run"), state, rtol=0, atol=0)  # plain names and whole shapes
    torch.save(torch.zeros(2, 64, dtype=torch.long), tmp_path / "tokens.pt")  # two windows of token ids
    predicted = subprocess.run([sys.executable, "-m", "dtrain.predict", f"ckpt={latest}",
                                f"input={tmp_path / 'tokens.pt'}", "topk=3"], cwd=ROOT, env=CHILD_ENV,
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and "tokens.pt[1]:" in predicted.stdout, predicted.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,nproc", [("ddp", 2), ("fsdp", 4)])
def test_a_ddp_or_fsdp_only_checkpoint_continues_at_2x2_as_it_continues_at_its_own_shape(tmp_path, strategy, nproc):
    """Same global batch, so the same trajectory: continued at 2x2 (FSDP over dp=2, tp=2), a checkpoint of a run
    without tensor parallelism reaches the weights it reaches where it was written."""
    first = run_cli(tmp_path / "first", *GPT_RUN, f"dist.strategy={strategy}", "trainer.max_steps=12", nproc=nproc,
                    timeout=600)
    assert first.code == 0, first
    runs = {}
    for name, layout, n in (("same", (f"dist.strategy={strategy}",), nproc), ("mesh", ("dist.tp=2",), 4)):
        shutil.copytree(tmp_path / "first" / "checkpoints", tmp_path / name / "checkpoints")
        runs[name] = run_cli(tmp_path / name, *GPT_RUN, *layout, "trainer.max_steps=18",
                             "checkpoint.allow_config_change=true", "trainer.log_every_n_steps=1", nproc=n, timeout=600)
        assert runs[name].code == 0 and "resumed from" in runs[name].out and " step 13/" in runs[name].out, runs[name]
    assert_same_weights(weights(runs["same"].dir), weights(runs["mesh"].dir), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_accumulation_activation_checkpointing_bf16_and_async_saves_work_on_the_mesh(tmp_path):
    common = (*GPT_RUN, "trainer.max_steps=6", "trainer.accumulate_grad_batches=2",
              "trainer.activation_checkpointing=true")
    plain = run_cli(tmp_path / "plain", *common, nproc=2, timeout=300)
    split = run_cli(tmp_path / "split", *common, "dist.tp=2", "dist.sequence_parallel=true", "dist.loss_parallel=true",
                    nproc=2, timeout=300)
    assert plain.code == 0 and split.code == 0, (plain, split)
    assert_same_weights(weights(plain.dir), weights(split.dir), rtol=0, atol=1e-4)
    fast = run_cli(tmp_path / "bf16", *common, "dist.tp=2", "trainer.precision=bf16", "checkpoint.async_save=true",
                   "checkpoint.every_n_steps=3", "dist.sequence_parallel=true", "dist.loss_parallel=true", nproc=2,
                   timeout=300)
    assert fast.code == 0 and fast.summary["precision"] == "bf16", fast
    assert {p.name for p in (fast.dir / "checkpoints").glob("step-*")} == {"step-00000003", "step-00000006"}


class Sums:  # the running sums a RankState carries (dtrain.tasks.Sums' reset/value)
    def __init__(self):
        self.now = torch.zeros(2)

    def reset(self, value=None):
        self.now = torch.zeros(2) if value is None else value.clone()

    def value(self):
        return self.now


def saved_ranks(world_size: int, dp_size: int) -> dict:
    """A RankState as `world_size` ranks of dp groups of world_size // dp_size would save it: each rank its
    own random state (seeded by its global rank here, to tell them apart) and sums (its dp rank's)."""
    from dtrain.checkpoint import rng_state
    ranks = []
    for r in range(world_size):
        torch.manual_seed(100 + r)
        ranks.append({"rng": rng_state(), "epoch_sums": torch.tensor([float(r // (world_size // dp_size)), 1.0])})
    return {"world_size": world_size, "dp_size": dp_size, "ranks": ranks}


@pytest.mark.unit
@pytest.mark.parametrize("rank,world,dp,expected_seed", [(1, 2, w.DataParallel(1, 2), 102),  # 2x2 -> 2x1
                                                         (3, 4, w.DataParallel(1, 2), 102)])  # 2x2 -> 2x2
def test_each_data_parallel_rank_continues_its_groups_random_state_whatever_tp_was(rank, world, dp, expected_seed):
    from dtrain.stateful import Progress, RankState
    torch.manual_seed(expected_seed)
    expected = torch.rand(3)
    state = RankState(w.World(rank=rank, world_size=world), 0, Progress(), Sums(), dp=dp)
    state.load_state_dict(saved_ranks(4, 2))  # saved at 2x2: dp rank 1 is global ranks 2 and 3
    assert torch.equal(torch.rand(3), expected) and state.sums.now.tolist() == [1.0, 1.0]


@pytest.mark.unit
def test_on_another_data_parallel_size_each_groups_sums_count_once_and_tp_ranks_share_a_seed():
    from dtrain.stateful import Progress, RankState
    draws = []
    for rank in (0, 1):  # one process's view each: a 2x2 checkpoint on 2 ranks of pure tp (dp=1)
        state = RankState(w.World(rank=rank, world_size=2), 0, Progress(), Sums(), dp=w.DataParallel(0, 1))
        state.load_state_dict(saved_ranks(4, 2))
        draws.append(torch.rand(3))
        assert state.sums.now.tolist() == [1.0, 2.0]  # dp ranks 0 and 1 of the saved run, each once
    assert torch.equal(draws[0], draws[1])  # the tp ranks of one group draw the same dropout noise
