"""The seams the next capabilities land on: a strategy and a task of one's own are one file each, registered
from outside dtrain; no strategy or task name is tested outside its own modules."""

import json
import re

import pytest
import torch
from torch.utils.data import TensorDataset

import dtrain

import seam_plugins
from conftest import ROOT, make_config, make_trainer, run_cli
from dtrain.errors import ConfigError


def test_a_strategy_registered_from_a_test_module_trains_by_its_name_and_is_asked_for_each_part(tmp_path,
                                                                                                quiet_logs):
    seam_plugins.Counting.calls.clear()
    t = make_trainer(tmp_path, "dist.strategy=counting", "data=synthetic", "data.num_samples=256",
                     "data.shape=[1,8,8]", "data.batch_size=32", "trainer.epochs=1", "trainer.grad_clip=1.0",
                     "trainer.accumulate_grad_batches=2", "logger=none", "checkpoint.enabled=false")
    summary = t.fit()
    steps = summary["steps"]
    assert type(t.strategy) is seam_plugins.Counting and steps == 204 // 32 // 2
    calls = seam_plugins.Counting.calls
    assert calls["wrap"] == 1 and calls["clip"] == steps
    assert calls["no_sync"] == steps and calls["sync"] == steps  # one accumulating micro-batch, then the reducing one
    assert calls["autocast"] >= 2 * steps  # every training forward, and evaluation's


def test_a_strategy_of_ones_own_is_named_by_its_dotted_path_on_the_command_line(tmp_path):
    run = run_cli(tmp_path / "run", "dist.strategy=seam_plugins.Counting", "trainer.epochs=1", "trainer.max_steps=3",
                  "logger.plots=false", env={"PYTHONPATH": str(ROOT / "tests")})
    assert run.code == 0 and run.summary["steps"] == 3, run


@pytest.mark.unit
def test_an_unknown_strategy_or_another_strategys_option_is_one_line():
    with pytest.raises(ConfigError, match=r"dist.strategy='nope' is not allowed: choose one of .*counting.*ddp, fsdp"):
        make_config("dist.strategy=nope")
    with pytest.raises(ConfigError, match=r"dist.find_unused_parameters=True is not allowed: an option of "
                                          r"DistributedDataParallel; with dist.strategy=counting leave it at its "
                                          r"default \(it needs dist.strategy=ddp\)"):
        make_config("dist.strategy=counting", "dist.find_unused_parameters=true")


@pytest.mark.unit
@pytest.mark.parametrize("names,owners", [
    (r"ddp|fsdp", "dtrain/strategy/"),
    (r"classification|regression|segmentation|language_modeling", "dtrain/tasks/"),
], ids=["strategy", "task"])
def test_no_strategy_or_task_name_is_compared_outside_its_own_modules(names, owners):
    compared = re.compile(rf"""(==|!=|\bin\b|\bis\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "dtrain").rglob("*.py")) if not str(path.relative_to(ROOT)).startswith(owners)
             for n, line in enumerate(path.read_text().splitlines(), 1) if compared.search(line)]
    assert not found, "\n".join(found)


def points(n: int = 400) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def test_a_task_registered_from_a_test_module_trains_by_its_name(tmp_path, quiet_logs):
    summary = dtrain.fit(torch.nn.Linear(4, 1), points(), overrides=[
        "data.task=binary", "trainer.epochs=8", "data.batch_size=20", "optim.lr=0.05", "logger.plots=false",
        f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["val_acc"] >= 0.9 and "val_f1" not in summary  # the task's metrics, not classification's
    assert summary["monitor"] == "val_acc"


def best_step(run_dir) -> int:
    from dtrain import checkpoint as ckpt
    return ckpt.load(run_dir / "checkpoints" / "best.pt")["step"]


def test_the_best_checkpoint_and_early_stopping_follow_any_reported_metric_and_its_mode(tmp_path, quiet_logs):
    def negative_error(out, y):  # a metric of one's own, higher is better: reported as val_negative_error
        return -(out.argmax(1) != y).float().mean()

    common = ["trainer.epochs=6", "data.batch_size=20", "optim.lr=0.02", "logger.plots=false",
              "checkpoint.keep_last=10"]
    for monitor, mode, pick in (("val_f1", "max", max), ("val_loss", "max", max), ("val_loss", "auto", min),
                                ("val_negative_error", "auto", max)):
        run = tmp_path / f"{monitor}-{mode}"
        summary = dtrain.fit(torch.nn.Linear(4, 2), points(), metrics={"negative_error": negative_error},
                             overrides=[*common, f"checkpoint.monitor={monitor}", f"checkpoint.mode={mode}",
                                        f"hydra.run.dir={run}"])
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        chosen = pick(epochs, key=lambda e: e[monitor])  # the first of equals, as a strict improvement keeps it
        assert best_step(run) == chosen["step"], (monitor, mode, [e[monitor] for e in epochs])
        assert summary["best"] == pytest.approx(chosen[monitor]) and summary["monitor"] == monitor
    stopped = dtrain.fit(torch.nn.Linear(4, 2), points(), overrides=[
        *common, "checkpoint.monitor=val_loss", "checkpoint.mode=max", "trainer.early_stopping.patience=2",
        f"hydra.run.dir={tmp_path / 'early'}"])
    epochs = [json.loads(line) for line in (tmp_path / "early" / "metrics.jsonl").read_text().splitlines()]
    worst = max(range(len(epochs)), key=lambda i: epochs[i]["val_loss"])
    assert stopped["stopped_early"] and len(epochs) == worst + 3  # two epochs without a higher val_loss, then stop


@pytest.mark.unit
def test_no_module_of_dtrain_imports_itself_round_a_circle():
    """Module-level imports between dtrain's modules form no circle (a package's own __init__ importing its
    submodules is the package, not a circle)."""
    import ast
    modules: dict[str, set[str]] = {}
    for path in (ROOT / "dtrain").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        modules[name] = {m for m in imported if m.startswith("dtrain")}
    package = {m for m in modules if any(other.startswith(m + ".") for other in modules)}
    edges = {m: {d for d in deps if d in modules and d != m and not (d in package and m.startswith(d + "."))}
             for m, deps in modules.items()}

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for d in edges[node]:
                if d == start:
                    return path + [d]
                if d not in seen:
                    seen.add(d)
                    stack.append((d, path + [d]))
        return None

    circles = [c for m in sorted(edges) if (c := circle_from(m))]
    assert not circles, circles[0]


@pytest.mark.unit
def test_the_rooms_stay_small_modules_functions_and_the_trainer():
    """Modules of at most 400 lines, functions of at most 60, the Trainer under 200."""
    import ast
    too_long = []
    for path in sorted((ROOT / "dtrain").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                too_long.append(f"{path.name}: {node.name} {size} lines")
            if isinstance(node, ast.ClassDef) and node.name == "Trainer" and size >= 200:
                too_long.append(f"Trainer {size} lines")
    assert not too_long, too_long


@pytest.mark.unit
def test_every_package_of_dtrain_ships_in_a_non_editable_install():
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dtrain").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
