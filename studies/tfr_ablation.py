"""Teacher-forcing ablation (the report's Table 1, Figs. 2 and 3): decaying TFR vs none.

    python -m studies.tfr_ablation [--seeds 0 1 2] [--profile smoke|cpu|full] [--epochs N]
                                   [--arms tfr_decay tfr_off] [--report-groups]
                                   [--data PATH] [--device cpu|cuda|mps]
                                   [--until-decided --max-seeds N [--seed-step K]]

Ablation ``tfr`` (experiments.registry), reference arm ``tfr_decay``, filed as the MLflow
experiment ``tfr_ablation``:
- Scientific hyperparameter: teacher forcing during training: ``tfr_decay`` (ratio 1.0, from
  epoch 10 lowered by 0.1 per epoch, drawn once per epoch as in the lab) vs ``tfr_off``
  (ratio 0: the previous *generated* frame always).
- Nuisance hyperparameters: the seed, averaged over ``--seeds``; the learning rate, held at
  3e-4 (2e-3 under the short ``cpu`` profile) for every arm (tune it per arm with
  ``python -m studies.tune``).
- Fixed hyperparameters: the rest of ``report_final``: cyclical KL (40 cycles, ratio 0.5,
  0.1 to 1), sigmoid output, N(0, I) prior, AdamW with cosine LR, batch 2; the profile sets
  data size, widths and epochs.

Readout that answers the question: ``final`` (val PSNR at the last epoch): the report's claim
is about the quality teacher forcing leaves the model with, not about speed. ``--until-decided``
tests it (by group with ``--report-groups``); the summary shows every readout, ``final`` first.

``--report-groups`` runs the report's own design instead (ablation ``report_tfr_groups``,
filed as the experiment ``tfr_report_groups``): two groups, ``tfr_decay`` and ``tfr_off``,
each holding the three KL arms (arm names ``<group>+kl_cyclical`` etc.); the KL schedule is
then a nuisance hyperparameter pooled within each group, and the loss curves show each group's
mean ± 1 sd across its runs (3 KL arms × seeds), as in Table 1. The group summary counts
each seed once (the mean of its runs over the group's arms, which share the seed): its
intervals are over seeds, not runs. Reference arm: ``tfr_decay+kl_cyclical``; reference group:
``tfr_decay``.
"""

from __future__ import annotations

import sys

from studies.cli import Study, Variant

STUDY = Study(
    name="tfr_ablation",
    ablation="tfr",
    doc=__doc__,
    variants=(Variant("--report-groups", "report_tfr_groups", "tfr_report_groups",
                      "the report's Table 1 design: each teacher-forcing group holds the three "
                      "KL arms (arm names tfr_decay+kl_cyclical, ...; experiment "
                      "tfr_report_groups)"),),
)

main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
