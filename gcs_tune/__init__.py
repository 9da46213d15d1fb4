"""gcs_tune: hyperparameter search for prompt learning on CLIP."""
