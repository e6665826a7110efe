"""Studies: groups of runs (ablation arms x seeds, tuning searches) and their reports.

    python -m studies.kl_ablation | tfr_ablation | sigmoid_ablation | prior_ablation
    python -m studies.tune | queue | report

The path of a study: ``cli`` (flags) -> ``grid`` (a ``Grid``: arms x seeds, resolved once;
``run_here`` trains it in this process) or ``queue`` (an Optuna work queue and its worker
processes) -> ``report``.

- ``cli``: the command line every ablation study shares
- ``grid``: the grid, its MLflow parent run, the loop that runs it here (serial or packed)
- ``queue``: the grid as an Optuna work queue; workers here or on other machines
- ``storage``: the rules of every ``--storage`` (kinds, heartbeats, locks, errors)
- ``tune`` / ``tuning``: Optuna searches (command line / search space, objective, plots)
- ``results``: a study read back from MLflow as tidy pandas tables
- ``summary``: statistics over seeds (t-intervals, Welch's test and the test paired by seed, verdicts)
- ``plots``: the standard seaborn figures, from the tidy tables
- ``report``: tables, summary and figures of a study, from MLflow alone
"""
