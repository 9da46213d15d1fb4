"""The search system: the only package that imports Ray and Optuna (``tracking`` alone imports
MLflow). ``space`` (YAML -> validated space -> Optuna), ``searcher`` (Optuna in Ray, with
constraints and pruned trials), ``trainable`` (a few lines around ``engine.fit``), ``callbacks``
(driver-side records, Parquet, MLflow, live view), ``runner`` (one study end to end)."""
