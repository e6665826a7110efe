"""Studies: groups of runs (ablation arms x seeds, tuning searches) and their reports.

    python -m studies.kl_ablation | tfr_ablation | sigmoid_ablation | prior_ablation
    python -m studies.calibration | tune | queue | report | summary --simulate
    python -m studies list

The path of a study: ``cli`` (flags) -> ``grid`` (a ``Grid``: arms x seeds, resolved once;
``run_here`` trains it in this process) or ``queue`` (an Optuna work queue and its worker
processes) -> ``report``. docs/ARCHITECTURE.md has the whole path.

- ``cli``: the command line every ablation study shares, and ``--until-decided`` (rounds of
  seeds, the group-sequential test after each)
- ``grid``: the grid, its MLflow parent run, the loop that runs it here (serial or packed)
- ``queue``: the grid as an Optuna work queue; workers here or on other machines
- ``storage``: the rules of every ``--storage`` (kinds, heartbeats, locks, errors)
- ``tune`` / ``tuning``: Optuna searches (command line / search space, objective, plots)
- ``results``: a study read back from MLflow as tidy pandas tables
- ``summary``: statistics over seeds (readouts, t-intervals, Welch's test and the test paired
  by seed, sequential boundaries, verdicts; ``--simulate`` checks them on made-up numbers)
- ``plots``: the standard seaborn figures, from the tidy tables
- ``report``: tables, summary and figures of a study, from MLflow alone
- ``ui``: the group curves and headline numbers the report logs on the parent run
- ``catalog`` (``python -m studies list``): every study in a store, its kind and state
- ``kl_ablation``, ``tfr_ablation``, ``sigmoid_ablation``, ``prior_ablation``,
  ``calibration``: one ``Study`` each (its ablation and the readouts that answer it)
"""
