"""The same project from Python: `python train.py`, `torchrun --nproc_per_node=2 train.py`, or under srun.
Extra arguments are dtrain overrides: python train.py trainer.epochs=2 data.batch_size=64"""

import sys

import dtrain
from seqcls.callbacks import LossHistory
from seqcls.data import Sequences
from seqcls.losses import FocalLoss
from seqcls.model import GRUClassifier

if __name__ == "__main__":
    from torchmetrics.classification import MulticlassF1Score
    summary = dtrain.fit(GRUClassifier, Sequences(size=1024), loss=FocalLoss(gamma=2.0),
                         metrics={"macro_f1_tm": MulticlassF1Score(num_classes=4, average="macro")},
                         callbacks=[LossHistory()], overrides=["optim.lr=0.01", "trainer.epochs=6",
                                                               "data.batch_size=32", *sys.argv[1:]])
    print(f"val_acc {summary['val_acc']:.3f} in {summary['run_dir']}")
