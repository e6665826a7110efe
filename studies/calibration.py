"""Calibration: an A/A check of the whole pipeline (training, readouts, verdicts), end to end.

    python -m studies.calibration --until-decided --max-seeds 6 [--seed-step 2]
                                  [--seeds 0 1] [--profile smoke|cpu|full] [--epochs N]
                                  [--arms calibration_reference calibration_copy
                                          calibration_low_lr]
                                  [--data PATH] [--device cpu|cuda|mps]

The simulations of ``python -m studies.summary --simulate`` check the statistics on made-up
numbers; this study checks them on real runs, whose noise is whatever training makes it.
Ablation ``calibration`` (experiments.registry), reference arm ``calibration_reference``,
filed as the MLflow experiment ``calibration``:
- ``calibration_reference``: the report's final model (``report_final``), as the other studies'
  reference arms.
- ``calibration_copy``: an exact copy of it under another name. Its only difference is a
  replicate salt (``train.replicate = 1``) mixed into the seeding of its random streams
  (initialisation, clip order, noise: ``experiments.runner.rng_seed``), so it trains on other
  random numbers at every seed instead of reproducing the reference bit for bit. Its spec
  hash differs from the reference's by that salt alone. There is nothing to find: its verdict
  must be "no detectable difference". A "better" or "worse" here is a false positive, which
  the verdicts allow 5% of the time (``--until-decided``: over all its looks together).
- ``calibration_low_lr``: the reference at a tenth of its learning rate at every profile
  (``optim.lr_scale = 0.1``), a known handicap: its verdict must be "worse". Failing to
  find it, at the seeds the study runs, is a miss (a lack of power).

So a calibration run passes when the copy is undecided and the low-lr arm is worse. Run it
as the studies are run, with the same flags: ``--until-decided`` shows the sequential test
stopping early for the real difference and running to ``--max-seeds`` for the copy (whose
summary gives the seeds a difference of the observed size would need).

- Scientific hyperparameter: none (the arms are an A/A pair and a known-worse control).
- Nuisance hyperparameters: the seed, averaged over ``--seeds``; the learning rate, held at
  the profile's (3e-4; 2e-3 under the short ``cpu`` profile) for the reference and the copy.
- Fixed hyperparameters: the rest of ``report_final``: cyclical KL (40 cycles, ratio 0.5,
  0.1 to 1), sigmoid output, N(0, I) prior, no teacher forcing, AdamW with cosine LR,
  batch 2; the profile sets data size, widths and epochs.

Readout that answers the question: ``final`` (val PSNR at the last epoch); the summary shows
every readout, ``final`` first, and the copy should be undecided on each of them.
"""

from __future__ import annotations

import sys

from studies.cli import Study

STUDY = Study(name="calibration", ablation="calibration", doc=__doc__, readouts=("final",))

main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
