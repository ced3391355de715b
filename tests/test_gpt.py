"""model=gpt, data=text and experiment=char_gpt (issue 32, item 1): a nanoGPT-style decoder that attends only
backwards, character windows split by position, and a recipe that learns well below the unigram perplexity."""

import math
import subprocess
import sys

import pytest
import torch

import dtrain
from conftest import CHILD_ENV, run_cli
from dtrain import api, app, data
from dtrain import world as w
from dtrain.errors import BadInput, ConfigError
from dtrain.gpt import GPT


@pytest.mark.unit
def test_a_token_changes_only_the_logits_at_and_after_its_position():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    ids = torch.randint(0, 11, (2, 8))
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1) % 11
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert before.shape == (2, 8, 11)
    torch.testing.assert_close(before[:, :5], after[:, :5])  # causal: the past does not see the future
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.unit
def test_the_head_is_tied_to_the_token_embedding_unless_told_otherwise():
    tied, untied = GPT(11, 8, 1, 2, 16), GPT(11, 8, 1, 2, 16, tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight and untied.lm_head.weight is not untied.wte.weight
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


def text_splits(tmp_path, corpus: str, *overrides: str):
    (tmp_path / "corpus.txt").write_text(corpus)
    cfg = app.make_config(app.compose(["model=gpt", "data=text", f"data.path={tmp_path / 'corpus.txt'}",
                                       *overrides]))
    return data.build(cfg.data, w.World())


@pytest.mark.unit
def test_text_windows_are_split_by_position_and_their_targets_are_the_next_characters(tmp_path):
    corpus = "".join(chr(97 + (i * 7) % 26) for i in range(1000))  # 26 letters, 1000 characters
    splits = text_splits(tmp_path, corpus, "data.block_size=10", "data.stride=5", "data.val_fraction=0.2")
    vocab = splits.class_names
    assert vocab == sorted(set(corpus)) and splits.out == 26 and splits.task == "language_modeling"
    decode = lambda ids: "".join(vocab[i] for i in ids.tolist())  # noqa: E731
    for part, (lo, hi) in ((splits.train, (0, 800)), (splits.val, (800, 1000))):
        for x, y in zip(part.x, part.y):
            window = decode(x) + decode(y[-1:])
            assert decode(y) == window[1:]  # the next characters
            start = corpus.find(window, lo)
            assert lo <= start and start + 11 <= hi  # inside its own part: no val window overlaps training
    assert len(splits.train) == len(range(0, 800 - 10, 5)) and len(splits.val) == len(range(0, 200 - 10, 5))


@pytest.mark.unit
def test_the_unigram_perplexity_is_the_training_frequencies_on_the_val_targets(tmp_path):
    splits = text_splits(tmp_path, "aab" * 100 + "ab" * 50, "data.block_size=4", "data.val_fraction=0.25")
    counts = {"a": 0, "b": 0}
    for c in ("aab" * 100 + "ab" * 50)[:300]:
        counts[c] += 1
    p = {c: (n + 1) / (300 + 2) for c, n in counts.items()}
    targets = "".join(splits.class_names[i] for i in splits.val.y.flatten().tolist())
    expected = math.exp(-sum(math.log(p[c]) for c in targets) / len(targets))
    assert splits.baselines["val_unigram_perplexity"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.unit
def test_a_missing_text_a_head_count_that_does_not_divide_and_too_short_a_text_are_one_line(tmp_path):
    with pytest.raises(BadInput, match=r"data.path=.*nothere.txt: no such file; give a UTF-8 text file"):
        cfg = app.make_config(app.compose(["model=gpt", "data=text", f"data.path={tmp_path / 'nothere.txt'}"]))
        data.build(cfg.data, w.World())
    with pytest.raises(ConfigError, match=r"model.n_embd=100 does not divide into model.n_head=3 heads"):
        app.make_config(app.compose(["model=gpt", "data=text", "model.n_embd=100", "model.n_head=3"]))
    with pytest.raises(BadInput, match=r"too few for windows of data.block_size=64"):
        text_splits(tmp_path, "short text", "data.block_size=64")


def test_char_gpt_reports_perplexity_tokens_per_sec_and_the_unigram_beside_them(tmp_path):
    run = run_cli(tmp_path / "run", "experiment=char_gpt", "trainer.max_steps=6", "trainer.device=cpu")
    assert run.code == 0, run
    s = run.summary
    assert s["model"] == "gpt" and s["monitor"] == "val_perplexity" and s["tokens_per_sec"] > 0
    assert s["val_perplexity"] == pytest.approx(math.exp(s["val_loss"]), rel=1e-6)
    assert 20 < s["val_unigram_perplexity"] < 40  # the bundled text's characters
    assert "unigram_perplexity" in run.out and "tokens/s" in run.out


@pytest.mark.slow
def test_char_gpt_learns_well_below_the_unigram_perplexity(tmp_path):
    run = run_cli(tmp_path / "run", "experiment=char_gpt", "trainer.device=cpu", timeout=600)
    assert run.code == 0, run
    assert run.summary["val_perplexity"] < 0.4 * run.summary["val_unigram_perplexity"], run.summary
    best = run.dir / "checkpoints" / "best.pt"  # used in one process: evaluated, and exported to ONNX and checked
    assert dtrain.evaluate(best)["perplexity"] == pytest.approx(run.summary["val_perplexity"], rel=1e-5)
    exported = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={best}", "format=onnx",
                               f"out={tmp_path / 'gpt.onnx'}"], cwd=tmp_path, env=CHILD_ENV, capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0 and "onnxruntime output within" in exported.stdout, exported.stderr[-3000:]


def test_evaluating_on_a_text_of_other_characters_is_one_line_not_a_wrong_perplexity(tmp_path, quiet_logs):
    (tmp_path / "a.txt").write_text("abcab " * 400)
    (tmp_path / "b.txt").write_text("xyzzy " * 400)
    api.train("model=gpt", "data=text", f"data.path={tmp_path / 'a.txt'}", "data.block_size=8",
                     "model.n_layer=1", "model.n_embd=16", "trainer.max_steps=2", "logger.plots=false",
                     f"hydra.run.dir={tmp_path / 'run'}")
    ckpt = tmp_path / "run" / "checkpoints" / "latest"
    assert dtrain.evaluate(ckpt, data={"path": str(tmp_path / "a.txt")})["samples"] > 0
    with pytest.raises(BadInput, match=r"data=text: its classes \(' ', 'x', 'y', 'z'\) are not those the checkpoint"):
        dtrain.evaluate(ckpt, data={"path": str(tmp_path / "b.txt")})
