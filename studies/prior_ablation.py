"""Prior ablation: the lab's fixed N(0, I) prior vs a learned prior (SVG-LP).

    python -m studies.prior_ablation [--seeds 0 1 2] [--profile smoke|cpu|full] [--epochs N]
                                     [--arms prior_standard prior_learned]
                                     [--data PATH] [--device cpu|cuda|mps]
                                     [--until-decided --max-seeds N [--seed-step K]]

Ablation ``prior`` (experiments.registry), reference arm ``prior_standard``, filed as the
MLflow experiment ``prior_ablation``:
- Scientific hyperparameter: the prior over z_t: ``prior_standard`` (N(0, I), the lab) vs
  ``prior_learned`` (p(z_t | x_{t-1}, P_t), learned as in SVG-LP; the KL is taken against it
  and generation samples from it).
- Nuisance hyperparameters: the seed, averaged over ``--seeds``; the learning rate, held at
  3e-4 (2e-3 under the short ``cpu`` profile) for every arm (tune it per arm with
  ``python -m studies.tune``).
- Fixed hyperparameters: the rest of ``report_final``: cyclical KL (40 cycles, ratio 0.5,
  0.1 to 1), sigmoid output, no teacher forcing, AdamW with cosine LR, batch 2; the profile
  sets data size, widths and epochs.

Readout that answers the question: ``final`` (val PSNR at the last epoch: does the learned
prior end with better predictions?); ``--until-decided`` tests it; the summary shows every
readout, ``final`` first.
"""

from __future__ import annotations

import sys

from studies.cli import Study

STUDY = Study(name="prior_ablation", ablation="prior", doc=__doc__)

main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
