"""Analysis tools: functions of a trained model and data, used by tests, experiments and reports."""
