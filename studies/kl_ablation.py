"""KL annealing ablation (the report's Table 2, Figs. 1 and 3): cyclical vs monotonic vs constant.

    python -m studies.kl_ablation [--seeds 0 1 2] [--profile smoke|cpu|full] [--epochs N]
                                  [--arms kl_cyclical kl_monotonic kl_constant]
                                  [--data PATH] [--device cpu|cuda|mps]
                                  [--until-decided --max-seeds N [--seed-step K]]

Ablation ``kl`` (experiments.registry), reference arm ``kl_cyclical``:
- Scientific hyperparameter: the KL weight schedule β(epoch): ``kl_cyclical`` (40 cycles,
  ratio 0.5, β from 0.1 to 1), ``kl_monotonic`` (one ramp, ratio 0.5, 0.1 to 1),
  ``kl_constant`` (β = 1 throughout).
- Nuisance hyperparameters: the seed (initialisation, clip order, latent noise), averaged over
  ``--seeds``; the learning rate, held at the report's 3e-4 (2e-3 under the short ``cpu``
  profile) for every arm (tune it per arm with
  ``python -m studies.tune`` before reading small differences as real).
- Fixed hyperparameters: the rest of the report's final model (``report_final``): sigmoid
  output, N(0, I) prior, AdamW (weight decay 0.01) with cosine LR, batch 2, grad-norm clip 1,
  no teacher forcing, evaluation with a prior sample of z; the profile sets data size, widths
  and epochs (400 at ``full``; epoch-indexed schedules keep their shape in epochs).

Readouts that answer the question (``studies.summary.READOUTS``): the report's KL findings are
about speed ("monotonic converges fastest, cyclical slowest but reaches a lower loss later"),
which final PSNR cannot test. So the primary readout is ``auc``, the mean val PSNR over
training (the area under the curve per epoch: it rewards learning early as well as ending
high), with ``epochs_to_floor`` (the first epoch at the copy-first floor + 1 dB, censored at
the last epoch) and ``final`` (val PSNR at the last epoch) beside it. ``--until-decided``
tests ``auc``; the summary shows all three first, then the others.
"""

from __future__ import annotations

import sys

from studies.cli import Study

STUDY = Study(name="kl_ablation", ablation="kl", doc=__doc__,
              readouts=("auc", "epochs_to_floor", "final"))

main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
