"""Output-activation ablation (the report's Section 3.4): identity vs sigmoid.

    python -m studies.sigmoid_ablation [--seeds 0 1 2] [--profile smoke|cpu|full]
                                       [--epochs N] [--arms identity sigmoid]
                                       [--data PATH] [--device cpu|cuda|mps]
                                       [--until-decided --max-seeds N [--seed-step K]]

Ablation ``output`` (experiments.registry), reference arm ``identity`` (the template), filed
as the MLflow experiment ``sigmoid_ablation``:
- Scientific hyperparameter: the generator's output activation: ``identity`` (the template:
  unbounded output) vs ``sigmoid`` (frames live in [0, 1]); the report measured ~33 → ~36-37 dB.
- Nuisance hyperparameters: the seed, averaged over ``--seeds``; the learning rate, held at
  3e-4 (2e-3 under the short ``cpu`` profile) for every arm (tune it per arm with
  ``python -m studies.tune``: an unbounded output may want another).
- Fixed hyperparameters: the rest of ``report_final``: cyclical KL (40 cycles, ratio 0.5,
  0.1 to 1), no teacher forcing, N(0, I) prior, AdamW with cosine LR, batch 2; the profile
  sets data size, widths and epochs.

Readout that answers the question: ``final`` (val PSNR at the last epoch: the report's ~33 vs
~36-37 dB); ``--until-decided`` tests it; the summary shows every readout, ``final`` first.
"""

from __future__ import annotations

import sys

from studies.cli import Study

STUDY = Study(name="sigmoid_ablation", ablation="output", doc=__doc__)

main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
