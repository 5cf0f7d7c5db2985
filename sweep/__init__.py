"""Optuna sweeps over precision_cfg x fidelity_cfg, Pareto fronts, reports and plots."""
