"""Pure scoring on arrays: selectors, confidence baselines, answers, statistics, NEX, tasks.
No model is needed: everything here can be studied offline on saved records."""
