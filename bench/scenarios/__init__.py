"""One module per scenario; each exposes `run_once(...)` returning one run's figures."""
