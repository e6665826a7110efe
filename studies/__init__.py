"""Studies: groups of runs (ablation arms × seeds, tuning searches) and their reports.

    python -m studies.kl_ablation | tfr_ablation | sigmoid_ablation | prior_ablation
    python -m studies.report [--study NAME]

- ``common``: the shared command line and orchestration of the ablation studies
- ``results``: a study read back from MLflow as tidy pandas tables
- ``summary``: statistics over seeds (t-intervals, Welch's test and the test paired by seed, verdicts)
- ``plots``: the standard seaborn figures, from the tidy tables
- ``report``: tables, summary and figures of a study, from MLflow alone
"""
