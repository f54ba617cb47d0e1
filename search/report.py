"""What a study records on its MLflow parent run: the leaderboard, the best config and Optuna's plots."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.leaderboard import leaderboard
from search.tracking import Tracker

RECORDED = "mlflow_recorded_trials"  # user attr: how many trials the parent run's records cover


def record_study(study: optuna.Study, tracker: Tracker, parent: str) -> None:
    """On the parent run: the leaderboard, the best config and Optuna's plots."""
    rows = leaderboard(study)
    # rewritten as a whole: MLflow's log_table appends, so every resume would add the rows again
    columns = list(rows[0]) if rows else []
    tracker.log(
        parent, dicts={"leaderboard.json": {"columns": columns, "data": [[r[k] for k in columns] for r in rows]}}
    )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete and len(study.directions) == 1:
        best = study.best_trial
        config = tracker.client.download_artifacts(best.user_attrs["mlflow_run_id"], "config.yaml")
        tracker.log(
            parent, metrics={"best/search_objective": best.value}, texts={"best_config.yaml": Path(config).read_text()}
        )
        tracker.tag(parent, "soupsearch.best_trial", str(best.number))
        _log_plots(tracker, parent, study, importances=len(complete) > 1 and len(best.params) > 1)
    tracker.end(parent)
    study.set_user_attr(RECORDED, len(study.trials))


def _log_plots(tracker: Tracker, parent: str, study: optuna.Study, importances: bool) -> None:
    """Optuna's plots as HTML (plotly) and PNG (Optuna's matplotlib backend, which needs no
    browser: plotly's PNG export through kaleido needs Chrome)."""
    import warnings

    os.environ.setdefault("MPLBACKEND", "Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt
    from optuna import visualization
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as static

    plots = {"optimization_history": (visualization.plot_optimization_history, static.plot_optimization_history)}
    if importances:
        plots["param_importances"] = (visualization.plot_param_importances, static.plot_param_importances)
    for name, (interactive, still) in plots.items():
        tracker.client.log_figure(parent, interactive(study), f"plots/{name}.html")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib backend is "experimental"
            figure = still(study).figure
        figure.tight_layout()
        tracker.client.log_figure(parent, figure, f"plots/{name}.png")
        plt.close(figure)
